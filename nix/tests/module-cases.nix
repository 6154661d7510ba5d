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
    # A Hugging Face directory, pinned file by file (the table of the repository's fixture).
    directory = bulwark (
      single
      // {
        model = {
          file = "/nix/store/00000000000000000000000000000000-smollm2-hf";
          inherit (demo) name;
          files = {
            "config.json" = "f94a023f70939af845285ec59d5d3d09be4d7ca1aeb12655322ef6dea86ce1a9";
            "model.safetensors" = "acffb0c7d5f084d3d0fb65be479b2f35e5e432cd993f7b3843e3a18cdc47bf1a";
            "tokenizer.json" = "7d27c493c729a66ecefc837280b05d948b1ed50d130eebdbf911b1b36cf38ed7";
            "tokenizer_config.json" = "cf3a433c9e98279168e575d9910a9c214ea25993534d99796a4f07f0a47a3bd3";
          };
        };
      }
    );
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
    both-model-pins = {
      expect = "set exactly one of sha256 (a GGUF file) and files";
      module = bulwark (single // { model = model // { files."config.json" = demo.sha256; }; });
    };
    no-model-pin = {
      expect = "set exactly one of sha256 (a GGUF file) and files";
      module = bulwark (single // { model = builtins.removeAttrs model [ "sha256" ]; });
    };
    bad-file-hash = {
      expect = "services.bulwark.model.files";
      module = bulwark (
        single
        // {
          model = builtins.removeAttrs model [ "sha256" ] // { files."config.json" = "F94A"; };
        }
      );
    };
    bad-model-hash = {
      expect = "services.bulwark.model.sha256";
      module = bulwark (single // { model = model // { sha256 = "B179"; }; });
    };
  };
}
