# services.bulwark configurations the harness evaluates (scripts/nix-check.sh). The `good`
# ones must evaluate with every assertion holding; each `bad` one must fail, for the reason
# given (the harness checks that the error message contains `expect`).
let
  demo = builtins.fromJSON (builtins.readFile ../../scripts/demo-model.json);
  model = {
    file = "/nix/store/00000000000000000000000000000000-${demo.file}";
    inherit (demo) sha256 name;
  };
  secrets = "/var/lib/bulwark-secrets";
  single = {
    enable = true;
    inherit model;
    apiKeysFile = "${secrets}/keys";
    tls.certificateFile = "${secrets}/cert.pem";
    tls.keyFile = "${secrets}/key.pem";
    openFirewall = true;
    settings = {
      server.listen = "0.0.0.0:8443";
      limits.max_tokens = 1024;
      engine.max_batch = 16;
    };
  };
  cluster = {
    caFile = "${secrets}/cluster-ca.pem";
    certificateFile = "${secrets}/cluster-cert.pem";
    keyFile = "${secrets}/cluster-key.pem";
  };
  bulwark = cfg: { services.bulwark = cfg; };
in
{
  good = {
    # The CPU node whose unit is scored by systemd-analyze.
    single = bulwark single;
    head = bulwark (
      single
      // {
        inherit cluster;
        settings = single.settings // {
          cluster = {
            role = "head";
            name = "head";
            layers = [
              0
              15
            ];
            stages = [
              {
                name = "worker-1";
                address = "10.89.0.11:7070";
                layers = [
                  15
                  30
                ];
              }
            ];
          };
        };
      }
    );
    worker = bulwark {
      enable = true;
      inherit model cluster;
      openFirewall = true;
      settings.cluster = {
        role = "worker";
        name = "worker-1";
        layers = [
          15
          30
        ];
        listen = "10.89.0.11:7070";
        head_name = "head";
        head_address = "10.89.0.10";
      };
    };
  };

  bad = {
    misspelled-option = {
      expect = "services.bulwark.setings' does not exist";
      module = bulwark (
        builtins.removeAttrs single [ "settings" ]
        // {
          setings.server.listen = "0.0.0.0:8443";
        }
      );
    };
    secret-in-store = {
      expect = "services.bulwark.tls.keyFile points into the Nix store";
      module = bulwark (
        single // { tls = single.tls // { keyFile = "/nix/store/00000000000000000000000000000000-key.pem"; }; }
      );
    };
    keys-file-in-store = {
      expect = "services.bulwark.apiKeysFile points into the Nix store";
      module = bulwark (single // { apiKeysFile = "/nix/store/00000000000000000000000000000000-keys"; });
    };
    unknown-role = {
      expect = "services.bulwark.settings.cluster.role";
      module = bulwark (single // { settings.cluster.role = "router"; });
    };
    worker-without-listen = {
      expect = "settings.cluster.listen is required on a worker";
      module = bulwark {
        enable = true;
        inherit model cluster;
        settings.cluster = {
          role = "worker";
          name = "worker-1";
        };
      };
    };
    head-without-cluster-key = {
      expect = "needs services.bulwark.cluster.caFile";
      module = bulwark (single // { settings.cluster.role = "head"; });
    };
    no-api-keys = {
      expect = "services.bulwark.apiKeysFile is required";
      module = bulwark (builtins.removeAttrs single [ "apiKeysFile" ]);
    };
    bad-model-hash = {
      expect = "services.bulwark.model.sha256";
      module = bulwark (single // { model = model // { sha256 = "B179"; }; });
    };
  };
}
