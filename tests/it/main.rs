//! Integration tests: the real `indexedcp` binary, real files, a real receiver on
//! 127.0.0.1, real signals. Modules by capability; `support` is the harness
//! shared with the benches, `fixtures` what only these tests need on top of it.

#[path = "../support/mod.rs"]
mod support;

mod fixtures;

mod agent;
mod broken_pipe;
mod cli_oneshot;
mod config_errors;
mod corruption;
mod failpoints;
mod faults;
mod library;
mod logging;
mod metrics;
mod mounted_over;
mod outage;
mod packaging;
mod properties;
mod receiver_batch;
mod receiver_compat;
mod receiver_input;
mod receiver_limits;
mod receiver_load;
mod receiver_names;
mod receiver_process;
mod receiver_resumable;
mod receiver_v1_recovery;
mod reload;
mod s3;
mod s3_cli;
mod spool_guards;
mod streaming;
mod supervision;
mod systemd_units;
mod tls;
mod tus_agent;
mod tus_receiver;
