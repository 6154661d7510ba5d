# A stand-in for `pkgs`, enough for services.bulwark and nix/vm-test.nix to evaluate with
# nixpkgs' lib alone. Derivations are attribute sets with a fake store path that keep their
# arguments (so the harness can read back what would be built); `formats.toml` has nixpkgs'
# exact TOML type (pkgs/pkgs-lib/formats.nix), which is what the module's settings are
# checked against.
lib:

let
  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  drv =
    name: attrs:
    let
      self = {
        type = "derivation";
        inherit name;
        outPath = storePath name;
        outputName = "out";
        outputs = [ "out" ];
        meta = { };
        out = self;
      }
      // attrs;
    in
    self;
  bin = name: drv name { meta.mainProgram = name; };
in
{
  inherit lib;
  stdenv.hostPlatform.system = "x86_64-linux";

  bulwark = bin "bulwark";
  nftables = bin "nft";
  curl = bin "curl";
  jq = bin "jq";
  netcat = bin "nc";
  openssl = bin "openssl";
  util-linux = bin "util-linux";
  coreutils = bin "coreutils";
  python3 = drv "python3" { interpreter = "${storePath "python3"}/bin/python3"; };

  runCommand = name: env: script: drv name (env // { inherit script; });
  writeText = name: text: drv name { inherit text; };
  writeScriptBin = name: text: drv name { inherit text; };
  fetchurl = args: drv (baseNameOf args.url) { inherit (args) url; };
  callPackage = f: args: throw "pkgs-stub: callPackage is not stubbed";

  formats.toml =
    { }:
    {
      type =
        let
          valueType =
            with lib.types;
            oneOf [
              bool
              int
              float
              str
              path
              (attrsOf valueType)
              (listOf valueType)
            ]
            // {
              description = "TOML value";
            };
        in
        valueType;
      # Keeps the value: the harness renders it to TOML itself.
      generate = name: value: drv name { inherit value; };
    };
}
