//! Inference: the model architectures, the sampler and the batching scheduler. Nothing here
//! imports hyper or tokio's networking; the API reaches it only through the scheduler's
//! bounded channels.

pub mod load;
pub mod models;
pub mod prefix;
pub mod sampler;
pub mod scheduler;
