//! Integration tests of the engine: the router without a socket, generation through the
//! scheduler, and agreement with llama.cpp. They run the real demo model
//! (`scripts/fetch-model.sh`; override with BULWARK_TEST_MODEL) and the tiny per-architecture
//! models of tests/models/ (`make_fixtures.py`; BULWARK_FIXTURES).

mod cluster;
mod families;
mod generation;
mod hf;
mod reference;
mod router;
mod util;
mod vocab;
