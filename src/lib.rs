//! tokentap: a transparent metering proxy for OpenAI-compatible Chat Completions APIs.
//!
//! See `DESIGN` in the repository for the data flow: the proxy (`proxy`) forwards bytes
//! unchanged, inspects requests and taps responses (`openai`), and hands one `UsageRecord`
//! (`meter`) per call to the sinks (`telemetry`).

pub mod admin;
pub mod auth;
pub mod budget;
pub mod config;
pub mod fuzzing;
pub mod meter;
pub mod openai;
pub mod proxy;
pub mod server;
pub mod telemetry;
