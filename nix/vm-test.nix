# A NixOS VM test (a module for pkgs.testers.runNixOSTest) generated from a topology file,
# vm-tests/topologies/<name>.toml (format: vm-tests/README.md), the same file
# vm-tests/lab.py runs in network namespaces.
#
# - One VM per [[nodes]] entry, all on VLAN 1 with the topology's own addresses on eth1.
# - engine/head/worker nodes run services.bulwark with its generated firewall; the NixOS
#   firewall is off on every node, so what is tested is the generated table alone (as in the
#   lab); `firewall = false` leaves a node with no table at all (the engine's own checks).
# - Certificates and API keys are made at build time with `bulwark certs` and
#   `bulwark keys new`, and copied out of the store at boot (the module refuses secrets in the
#   store).
# - The test script (nix/vm-test-lib.py) checks every [[expect]] row, then every [[fault]].
{
  lib,
  pkgs,
  # The bulwark package and services.bulwark (the flake's nixosModules.bulwark).
  bulwark,
  bulwarkModule,
  # The demo model derivation (nix/demo-model.nix).
  demoModel,
  # The parsed topology (builtins.fromTOML).
  topology,
}:

let
  inherit (lib)
    concatMapStrings
    elem
    filter
    listToAttrs
    mkForce
    nameValuePair
    optional
    optionalAttrs
    ;

  nodes = topology.nodes;
  prefixLength = lib.toInt (lib.last (lib.splitString "/" topology.subnet));
  engineRoles = [
    "engine"
    "head"
    "worker"
  ];
  isEngine = n: elem n.role engineRoles;
  hasApi = n: elem n.role [
    "engine"
    "head"
  ];
  inCluster = n: elem n.role [
    "head"
    "worker"
  ];
  heads = filter (n: n.role == "head") nodes;
  head = if heads == [ ] then null else builtins.head heads;
  # Pipeline order is the order of the file.
  workers = filter (n: n.role == "worker") nodes;
  clusterNodes = filter inCluster nodes;
  engineUser = "bulwark";
  modelName = "smollm2";
  referencePort = 18080;

  # The test driver's name for a machine (nixos/lib/test-driver: pythonize_name).
  pythonName =
    name:
    lib.concatMapStrings (c: if builtins.match "[A-Za-z0-9_]" c != null then c else "_") (
      lib.stringToCharacters name
    );

  # Every key and certificate of the topology, made with the binary under test. Test material
  # only: it lives in the store and is copied to /var/lib/bulwark-secrets at boot.
  secrets =
    pkgs.runCommand "bulwark-${topology.name}-secrets" { nativeBuildInputs = [ bulwark ]; }
      ''
        mkdir -p $out/foreign
        bulwark certs ca --dir $out/api-ca
        bulwark certs ca --dir $out/cluster-ca
        bulwark certs ca --dir $out/foreign-ca
        ${concatMapStrings (n: ''
          mkdir -p $out/${n.name}
          bulwark certs issue --ca-dir $out/api-ca --name ${n.name} --ip ${n.address} --ip 127.0.0.1 --out $out/${n.name}/api
          bulwark keys new --name lab --keys-file $out/${n.name}/keys > $out/${n.name}/api-key
        '') (filter hasApi nodes)}
        ${concatMapStrings (n: ''
          mkdir -p $out/${n.name}
          bulwark certs issue --ca-dir $out/cluster-ca --name ${n.name} --ip ${n.address} --out $out/${n.name}/cluster
          bulwark certs issue --ca-dir $out/foreign-ca --name ${n.name} --ip ${n.address} --out $out/foreign/${n.name}
        '') clusterNodes}
        # Readable by the test clients (any user) inside the VMs; the server gets 0600 copies.
        chmod -R a+rX $out
      '';

  # Plain TCP listeners standing in for other software (as in vm-tests/lab.py).
  serviceUnits =
    n:
    listToAttrs (
      map (
        svc:
        nameValuePair "lab-service-${svc.name}" {
          description = "Stand-in TCP service ${svc.name} on port ${toString svc.port}";
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = "${pkgs.python3.interpreter} -c ${lib.escapeShellArg ''
            import socket
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", ${toString svc.port}))
            s.listen(16)
            while True:
                c, _ = s.accept()
                c.close()
          ''}";
        }
      ) (n.services or [ ])
    );

  probe = pkgs.writeScriptBin "bulwark-lab-probe" ''
    #!${pkgs.python3.interpreter}
    ${builtins.readFile ./vm-probe.py}
  '';

  # The single-node reference for `same-tokens`: the same model, plain HTTP on loopback,
  # started by the test script only when a row needs it.
  referenceConfig = pkgs.writeText "bulwark-reference.toml" ''
    [server]
    listen = "127.0.0.1:${toString referencePort}"
    plaintext = true
    keys_file = "/var/lib/bulwark-secrets/keys"

    [model]
    path = "${demoModel}"
    sha256 = "${demoModel.sha256}"
    name = "${modelName}"
    context_length = 2048

    [metrics]
    listen = "127.0.0.1:${toString (referencePort + 1)}"

    [sandbox]
    user = "${engineUser}"
    group = "${engineUser}"
  '';

  secretsDir = "/var/lib/bulwark-secrets";

  engineConfig =
    n:
    { lib, ... }:
    {
      imports = [ bulwarkModule ];

      services.bulwark = {
        enable = true;
        package = bulwark;
        user = engineUser;
        group = engineUser;
        model = {
          file = demoModel;
          inherit (demoModel) sha256;
          name = modelName;
        };
        applyFirewall = n.firewall or true;
        settings = {
          model.context_length = 2048;
          engine.threads = 1;
        }
        // optionalAttrs (hasApi n) {
          server.listen = "${n.address}:${toString n.api_port}";
        }
        // optionalAttrs (n ? metrics_port) {
          metrics = {
            listen = "${if n.metrics_public or false then "0.0.0.0" else "127.0.0.1"}:${toString n.metrics_port}";
            allow_non_loopback = n.metrics_public or false;
          };
        }
        // optionalAttrs (n.role == "head") {
          cluster = {
            role = "head";
            inherit (n) name layers;
            stages = map (w: {
              inherit (w) name layers;
              address = "${w.address}:${toString w.cluster_port}";
            }) workers;
          };
        }
        // optionalAttrs (n.role == "worker") {
          cluster = {
            role = "worker";
            inherit (n) name layers;
            listen = "${n.address}:${toString n.cluster_port}";
            head_name = head.name;
            head_address = head.address;
          };
        };
      }
      // optionalAttrs (hasApi n) {
        apiKeysFile = "${secretsDir}/keys";
        tls.certificateFile = "${secretsDir}/cert.pem";
        tls.keyFile = "${secretsDir}/key.pem";
      }
      // optionalAttrs (inCluster n) {
        cluster = {
          caFile = "${secretsDir}/cluster-ca.pem";
          certificateFile = "${secretsDir}/cluster-cert.pem";
          keyFile = "${secretsDir}/cluster-key.pem";
        };
      };

      # Build-time test secrets out of the store, root-only, before the server starts.
      systemd.services.lab-secrets = {
        description = "Copy the topology's test secrets out of the store";
        wantedBy = [ "multi-user.target" ];
        requiredBy = [ "bulwark.service" ];
        before = [ "bulwark.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          UMask = "0077";
        };
        script = ''
          install -d -m 0700 ${secretsDir}
        ''
        + lib.optionalString (hasApi n) ''
          install -m 0600 ${secrets}/${n.name}/keys ${secretsDir}/keys
          install -m 0600 ${secrets}/${n.name}/api/cert.pem ${secretsDir}/cert.pem
          install -m 0600 ${secrets}/${n.name}/api/key.pem ${secretsDir}/key.pem
        ''
        + lib.optionalString (inCluster n) ''
          install -m 0600 ${secrets}/cluster-ca/ca.pem ${secretsDir}/cluster-ca.pem
          install -m 0600 ${secrets}/${n.name}/cluster/cert.pem ${secretsDir}/cluster-cert.pem
          install -m 0600 ${secrets}/${n.name}/cluster/key.pem ${secretsDir}/cluster-key.pem
        '';
      };

      systemd.services.bulwark-reference = lib.mkIf (hasApi n) {
        description = "Single-node reference engine for same-tokens checks";
        after = [ "lab-secrets.service" ];
        requires = [ "lab-secrets.service" ];
        # Started as root: the engine binds, reads its keys, then drops to sandbox.user.
        serviceConfig.ExecStart = "${lib.getExe bulwark} serve --config ${referenceConfig}";
      };

      # The model is dequantized to f32 (~4x its file size), twice with the reference.
      virtualisation.memorySize = 3072;
      virtualisation.cores = 2;
    };

  nodeConfig =
    n:
    { lib, ... }:
    {
      imports = optional (isEngine n) (engineConfig n);

      networking.hostName = n.name;
      # The topology's address on the test VLAN (eth1) instead of the driver's 192.168.1.N.
      virtualisation.vlans = [ 1 ];
      networking.interfaces.eth1.ipv4.addresses = mkForce [
        {
          inherit (n) address;
          inherit prefixLength;
        }
      ];
      networking.interfaces.eth1.ipv6.addresses = mkForce [ ];
      networking.primaryIPAddress = mkForce n.address;
      networking.primaryIPv6Address = mkForce "";
      # Only the generated table filters (as in the netns lab); the NixOS firewall would
      # otherwise make every `closed` row pass for its own reasons.
      networking.firewall.enable = false;

      systemd.services = serviceUnits n;

      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
        pkgs.netcat
        pkgs.openssl
        pkgs.util-linux
        probe
      ];
    };

  script = ''
    # Generated by nix/vm-test.nix from vm-tests/topologies/${topology.name}.toml.
    TOPOLOGY = json.loads(${builtins.toJSON (builtins.toJSON topology)})
    MACHINES = {${
      lib.concatMapStringsSep ", " (n: "${builtins.toJSON n.name}: ${pythonName n.name}") nodes
    }}
    SECRETS = "${secrets}"
    ENGINE_USER = "${engineUser}"
    REFERENCE_PORT = ${toString referencePort}
    MODEL_NAME = "${modelName}"
  '';
in
{
  name = "bulwark-${topology.name}";
  # Everything the driver needs to know is in the script; nodes are plain NixOS machines.
  nodes = listToAttrs (map (n: nameValuePair n.name (nodeConfig n)) nodes);
  testScript = "import json\n" + script + builtins.readFile ./vm-test-lib.py;
}
