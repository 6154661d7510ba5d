# services.bulwark: the Bulwark inference server as a NixOS service.
#
# - The configuration is `settings` (RFC 42, freeform TOML; docs/configuration.md), rendered
#   once and checked at build time with `bulwark check-config` (a typo fails the build).
# - Secrets (API keys file, TLS key, cluster key) are never in `settings` or the store: they
#   are paths on the machine, handed to the service with `LoadCredential`.
# - The firewall is rendered by `bulwark firewall apply` from the same configuration, in a unit
#   ordered before the server; the NixOS firewall is opened only for the ports those rules open.
# - The server starts unprivileged (a static user, named by the firewall's egress rule) inside
#   a systemd sandbox, and then confines itself (Landlock, seccomp) before serving.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.bulwark;
  settingsFormat = pkgs.formats.toml { };

  # Where systemd puts the credentials of bulwark.service (LoadCredential); the paths the
  # rendered configuration names.
  credentialsDir = "/run/credentials/bulwark.service";
  credential = name: "${credentialsDir}/${name}";

  role = cfg.settings.cluster.role;
  isWorker = role == "worker";
  inCluster = role != null;

  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));
  hostOf =
    listen:
    lib.removePrefix "[" (lib.removeSuffix "]" (lib.concatStringsSep ":" (lib.init (lib.splitString ":" listen))));

  # The addresses the server may exchange packets with (IPAddressAllow; cgroup BPF, on top of
  # the generated table): its peers, the API's sources (any when not restricted), loopback.
  apiSources = cfg.settings.firewall.api_sources or [ ];
  # The server's own listening address: a local client connecting to it comes from it.
  ownListen = if isWorker then cfg.settings.cluster.listen else cfg.settings.server.listen;
  ownAddress = lib.optional (
    ownListen != null && !(lib.elem (hostOf ownListen) [ "0.0.0.0" "::" ])
  ) (hostOf ownListen);
  peers =
    if isWorker then
      [ cfg.settings.cluster.head_address ]
    else
      map (stage: hostOf stage.address) (cfg.settings.cluster.stages or [ ]);
  ipAddressAllow =
    [ "localhost" ] ++ ownAddress ++ peers ++ lib.optionals (!isWorker) (if apiSources == [ ] then [ "any" ] else apiSources);
  apiPort = portOf cfg.settings.server.listen;
  clusterPort = portOf cfg.settings.cluster.listen;

  # Secrets: the option (for messages), its value, the credential's name.
  secret = option: value: name: { inherit option value name; };
  secrets = lib.filter (s: s.value != null) [
    (secret "apiKeysFile" cfg.apiKeysFile "keys")
    (secret "tls.certificateFile" cfg.tls.certificateFile "tls-cert")
    (secret "tls.keyFile" cfg.tls.keyFile "tls-key")
    (secret "tls.clientCaFile" cfg.tls.clientCaFile "client-ca")
    (secret "cluster.caFile" cfg.cluster.caFile "cluster-ca")
    (secret "cluster.certificateFile" cfg.cluster.certificateFile "cluster-cert")
    (secret "cluster.keyFile" cfg.cluster.keyFile "cluster-key")
  ];
  # `toString`, never interpolation: interpolating a path literal would copy the secret into
  # the world-readable store, the very thing the assertion below refuses.
  inStore = p: lib.hasPrefix "${builtins.storeDir}/" (toString p);

  # What the module itself writes into the configuration: the credential paths. Computed
  # here rather than defined into `settings`, whose cluster.role it depends on.
  dropNulls = lib.filterAttrsRecursive (_: v: v != null);
  managed =
    lib.optionalAttrs (!isWorker) {
      server = dropNulls {
        tls_cert = if cfg.tls.certificateFile != null then credential "tls-cert" else null;
        tls_key = if cfg.tls.keyFile != null then credential "tls-key" else null;
        client_ca = if cfg.tls.clientCaFile != null then credential "client-ca" else null;
        keys_file = if cfg.apiKeysFile != null then credential "keys" else null;
      };
    }
    // lib.optionalAttrs inCluster {
      cluster = {
        ca = credential "cluster-ca";
        cert = credential "cluster-cert";
        key = credential "cluster-key";
      };
    };
  # TOML has no null: drop unset typed options, a worker's [server] and an unused [cluster].
  rendered = lib.recursiveUpdate (builtins.removeAttrs (dropNulls cfg.settings) (
    lib.optional isWorker "server" ++ lib.optional (!inCluster) "cluster"
  )) managed;

  # The checked configuration (nixpkgs atticd's checkedConfigFile): the build fails, naming the
  # key and the reason, when the server would refuse it.
  configFile =
    pkgs.runCommand "bulwark.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        uncheckedConfig = settingsFormat.generate "bulwark-unchecked.toml" rendered;
        preferLocalBuild = true;
      }
      ''
        bulwark check-config --config "$uncheckedConfig"
        cp "$uncheckedConfig" "$out"
      '';

  bulwarkExe = lib.getExe cfg.package;
  rootDirectory = "/run/bulwark";
in
{
  options.services.bulwark = {
    enable = mkEnableOption "Bulwark, a secure-by-default LLM inference server";

    package = mkPackageOption pkgs "bulwark" { };

    user = mkOption {
      type = types.str;
      default = "bulwark";
      description = ''
        The unprivileged user the server runs as. Created by the module when left at the
        default. The generated firewall limits this user's outbound traffic to its peers
        (`meta skuid`), so it must not be shared with other software.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "bulwark";
      description = "The group the server runs as.";
    };

    model = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://example.org/SmolLM2-135M-Instruct.Q4_1.gguf";
        description = ''
          Where to fetch the GGUF file at build time. The download is a fixed-output
          derivation pinned by {option}`services.bulwark.model.sha256`, the same digest the
          server checks before parsing the file. Leave `null` and set
          {option}`services.bulwark.model.file` for a local file or a package.
        '';
      };

      file = mkOption {
        type = types.path;
        defaultText = lib.literalExpression ''
          pkgs.fetchurl { inherit (config.services.bulwark.model) url sha256; }
        '';
        example = lib.literalExpression "bulwark.packages.x86_64-linux.demo-model";
        description = ''
          The model: a GGUF file (pinned by {option}`services.bulwark.model.sha256`), or a
          Hugging Face directory of safetensors weights (pinned file by file by
          {option}`services.bulwark.model.files`). Read-only to the server, which opens it
          before it confines itself and can open nothing else afterwards.
        '';
      };

      sha256 = mkOption {
        type = types.nullOr (types.strMatching "[0-9a-f]{64}");
        default = null;
        example = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        description = "SHA-256 of a GGUF model file, lower-case hex (`bulwark model hash FILE`).";
      };

      files = mkOption {
        type = types.nullOr (types.attrsOf (types.strMatching "[0-9a-f]{64}"));
        default = null;
        example = {
          "config.json" = "f94a023f70939af845285ec59d5d3d09be4d7ca1aeb12655322ef6dea86ce1a9";
          "model.safetensors" = "acffb0c7d5f084d3d0fb65be479b2f35e5e432cd993f7b3843e3a18cdc47bf1a";
        };
        description = ''
          For a Hugging Face directory: the SHA-256 of every file the server reads, by file
          name (`bulwark model hash DIR` prints the table). Each is checked before any is
          parsed; a file the server needs that is not listed is refused by name.
        '';
      };

      name = mkOption {
        type = types.str;
        example = "smollm2-135m-instruct";
        description = "The model id clients send as `model`.";
      };
    };

    settings = mkOption {
      default = { };
      description = ''
        The server's configuration (docs/configuration.md), rendered to TOML and checked with
        `bulwark check-config` at build time. The module fills in `model`, the credential
        paths (`server.tls_cert`, `server.tls_key`, `server.keys_file`, `server.client_ca`,
        `cluster.ca`, `cluster.cert`, `cluster.key`), `sandbox.user`/`sandbox.group` and
        `firewall.engine_user`; secrets never go here.
      '';
      example = lib.literalExpression ''
        {
          server.listen = "0.0.0.0:8443";
          limits.max_tokens = 1024;
          engine.max_batch = 16;
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          server = mkOption {
            default = { };
            description = "`[server]`. Not rendered on a cluster worker, which serves no API.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options.listen = mkOption {
                type = types.str;
                default = "0.0.0.0:8443";
                description = "API listener, `ADDR:PORT`; its port is the one the firewall opens.";
              };
            };
          };

          cluster = mkOption {
            default = { };
            description = "`[cluster]` (docs/cluster.md). Rendered only when `role` is set.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                role = mkOption {
                  type = types.nullOr (
                    types.enum [
                      "head"
                      "worker"
                    ]
                  );
                  default = null;
                  description = ''
                    `null`: a single node. `head`: serves the API and drives the stages listed
                    in `cluster.stages`. `worker`: runs one stage, listens on `cluster.listen`
                    and serves no API.
                  '';
                };
                listen = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "10.89.0.11:7070";
                  description = "A worker's internal listener, `ADDR:PORT`.";
                };
              };
            };
          };

          firewall.table = mkOption {
            type = types.strMatching "[a-z0-9_]{1,32}";
            default = "bulwark";
            description = "The nftables table (family `inet`) the generated rules live in.";
          };
        };
      };
    };

    apiKeysFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/bulwark-secrets/keys";
      description = ''
        Hashed API keys (`bulwark keys new --name NAME --keys-file FILE`), outside the store,
        mode 0600, owned by root: systemd hands the server a copy (`LoadCredential`).
        Required unless the node is a cluster worker.
      '';
    };

    tls = {
      certificateFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "The API's certificate chain (PEM). Required unless `settings.server.plaintext`.";
      };
      keyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "The API certificate's private key (PEM), outside the store, mode 0600.";
      };
      clientCaFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "When set, API clients must also present a certificate this CA signed.";
      };
    };

    cluster = {
      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "The cluster CA (`bulwark certs ca`); never the API's CA.";
      };
      certificateFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "This node's cluster certificate (`bulwark certs issue`).";
      };
      keyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "This node's cluster private key, outside the store, mode 0600.";
      };
    };

    applyFirewall = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Load the nftables table that `bulwark firewall print` renders from this configuration
        (input policy drop but the API and the peers' internal ports; the server's own user may
        only reach its peers) before the server starts. Enables `networking.nftables`.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open in the NixOS firewall exactly the ports the generated rules accept: the API port,
        or a worker's cluster port. A packet must pass every nftables base chain, so with the
        NixOS firewall on, these ports are closed without this. Metrics are never opened.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      map (s: {
        assertion = !(inStore s.value);
        message = ''
          services.bulwark.${s.option} points into the Nix store (${toString s.value}), which
          every local user can read. Keep secrets outside the store (for example under
          /var/lib/bulwark-secrets, mode 0600); the module loads them with LoadCredential.
        '';
      }) secrets
      ++ [
        {
          assertion = isWorker || cfg.apiKeysFile != null;
          message = "services.bulwark.apiKeysFile is required (every request needs a key).";
        }
        {
          assertion =
            isWorker
            || (cfg.settings.server.plaintext or false)
            || (cfg.tls.certificateFile != null && cfg.tls.keyFile != null);
          message = "services.bulwark.tls.certificateFile and tls.keyFile are required unless settings.server.plaintext = true.";
        }
        {
          assertion =
            !inCluster
            || (cfg.cluster.caFile != null && cfg.cluster.certificateFile != null && cfg.cluster.keyFile != null);
          message = "services.bulwark.settings.cluster.role = \"${toString role}\" needs services.bulwark.cluster.caFile, certificateFile and keyFile.";
        }
        {
          assertion = (cfg.model.sha256 == null) != (cfg.model.files == null);
          message = "services.bulwark.model: set exactly one of sha256 (a GGUF file) and files (a Hugging Face directory).";
        }
        {
          assertion = cfg.model.url == null || cfg.model.sha256 != null;
          message = "services.bulwark.model.url fetches one GGUF file pinned by services.bulwark.model.sha256.";
        }
        {
          assertion = !isWorker || cfg.settings.cluster.listen != null;
          message = "services.bulwark.settings.cluster.listen is required on a worker.";
        }
      ];

    services.bulwark.model.file = lib.mkIf (cfg.model.url != null) (
      lib.mkDefault (
        pkgs.fetchurl {
          inherit (cfg.model) url sha256;
        }
      )
    );

    services.bulwark.settings = {
      model = {
        # Interpolated, so that a local file is copied into the store and the model is part of
        # the system's closure (it is public; only secrets must stay out).
        path = "${cfg.model.file}";
        inherit (cfg.model) name;
      }
      // (if cfg.model.files != null then { inherit (cfg.model) files; } else { inherit (cfg.model) sha256; });
      # Used only when the server is started as root (it is not, here); kept equal to the
      # service's user so the configuration means the same thing when run by hand.
      sandbox = {
        user = lib.mkDefault cfg.user;
        group = lib.mkDefault cfg.group;
      };
      firewall.engine_user = lib.mkDefault cfg.user;
    };

    users.users = mkIf (cfg.user == "bulwark") {
      bulwark = {
        isSystemUser = true;
        inherit (cfg) group;
        description = "Bulwark inference server";
      };
    };
    users.groups = mkIf (cfg.group == "bulwark") { bulwark = { }; };

    environment.etc."bulwark/bulwark.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    networking.nftables.enable = mkIf cfg.applyFirewall true;
    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
      if isWorker then [ clusterPort ] else [ apiPort ]
    );

    systemd.services.bulwark-firewall = mkIf cfg.applyFirewall {
      description = "Bulwark's nftables table";
      documentation = [ "https://github.com/bulwark-inference/bulwark/blob/main/docs/firewall.md" ];
      wantedBy = [ "multi-user.target" ];
      before = [
        "bulwark.service"
        "network-pre.target"
      ];
      wants = [ "network-pre.target" ];
      after = [ "nftables.service" ];
      # nftables.service flushes the whole ruleset when it starts, stops or reloads: load the
      # table again each time.
      partOf = [ "nftables.service" ];
      unitConfig.ReloadPropagatedFrom = [ "nftables.service" ];
      restartTriggers = [ configFile ];
      path = [ pkgs.nftables ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = [
          "${bulwarkExe} firewall apply --config ${configFile}"
          # Fails the unit (and so the server, which requires it) on any drift.
          "${bulwarkExe} firewall verify --config ${configFile}"
        ];
        ExecReload = [
          "${bulwarkExe} firewall apply --config ${configFile}"
          "${bulwarkExe} firewall verify --config ${configFile}"
        ];
        ExecStop = "${lib.getExe pkgs.nftables} delete table inet ${cfg.settings.firewall.table}";

        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        NoNewPrivileges = true;
        PrivateDevices = true;
        PrivateTmp = true;
        ProtectHome = true;
        ProtectKernelModules = true;
        ProtectSystem = "strict";
        RestrictAddressFamilies = [
          "AF_NETLINK" # nft talks to the kernel over netlink
          "AF_UNIX" # user name lookup (NSS)
        ];
        RestrictNamespaces = true;
        SystemCallArchitectures = "native";
      };
    };

    systemd.services.bulwark = {
      description = "Bulwark LLM inference server";
      documentation = [ "https://github.com/bulwark-inference/bulwark/blob/main/docs/operations.md" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ lib.optional cfg.applyFirewall "bulwark-firewall.service";
      # No firewall, no server: never serve with the generated table missing.
      requires = lib.optional cfg.applyFirewall "bulwark-firewall.service";
      restartTriggers = [ configFile ];

      serviceConfig = {
        ExecStart = "${bulwarkExe} serve --config ${configFile} --log-format json";
        User = cfg.user;
        Group = cfg.group;
        LoadCredential = map (s: "${s.name}:${toString s.value}") secrets;
        Restart = "on-failure";
        # Long enough for `systemctl stop` after a crash to cancel the restart.
        RestartSec = 5;
        # Loading and dequantizing a large model takes a while.
        TimeoutStartSec = 300;

        # Hardening, on top of the server's own Landlock and seccomp confinement
        # (docs/landlock.md, docs/seccomp.md). One block, alphabetical; each relaxation or
        # non-obvious value says why. Scored by scripts/nix-check.sh (systemd-analyze
        # security --offline), at most 1.0 for a CPU node.
        AmbientCapabilities = "";
        # An empty root with only the store (binary, model, configuration) bound read-only;
        # systemd mounts the credentials, /proc, /sys and a private /dev into it.
        BindReadOnlyPaths = [ builtins.storeDir ];
        CapabilityBoundingSet = "";
        DevicePolicy = "closed";
        # The root directory itself is not reachable from inside.
        InaccessiblePaths = [ "-+${rootDirectory}" ];
        # With the generated firewall: loopback, the peers and the API's sources (any, unless
        # firewall.api_sources is set; a worker: its head only). Without it (applyFirewall =
        # false) nothing filters by address, so the server's own checks face the network.
        IPAddressAllow = mkIf cfg.applyFirewall ipAddressAllow;
        IPAddressDeny = mkIf cfg.applyFirewall "any";
        KeyringMode = "private";
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        MountAPIVFS = true;
        NoNewPrivileges = true;
        PrivateDevices = true;
        PrivateIPC = true;
        PrivateMounts = true;
        # No PrivateNetwork: the server listens on the host's addresses (the API, a
        # worker's cluster port).
        PrivateTmp = true;
        PrivateUsers = true;
        ProcSubset = "pid";
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHome = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProtectSystem = "strict";
        RemoveIPC = true;
        RestrictAddressFamilies = [
          # TCP only (the API, the cluster); no AF_UNIX, no netlink.
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RootDirectory = rootDirectory;
        RuntimeDirectory = baseNameOf rootDirectory;
        RuntimeDirectoryMode = "0700";
        SystemCallArchitectures = "native";
        SystemCallErrorNumber = "EPERM";
        SystemCallFilter = [
          # @system-service includes capset (of @privileged, the one group left allowed): the
          # server empties its capability sets itself before serving and refuses to start if
          # it cannot.
          "@system-service"
          # The server confines itself: its own, narrower seccomp filter and Landlock rules.
          "seccomp"
          "landlock_create_ruleset"
          "landlock_add_rule"
          "landlock_restrict_self"
          "~@resources @obsolete"
        ];
        UMask = "0077";
      };
    };
  };
}
