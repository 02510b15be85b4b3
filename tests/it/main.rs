//! wpimg's integration tests, in one binary (one link of bollard, reqwest and the AWS SDK):
//! a module per area and one set of shared helpers (`common`). Real components only: a missing
//! one fails the test, never skips it.

mod common;

mod accel;
mod assemble;
mod browser;
mod build;
mod ci_jobs;
mod cli_rules;
mod ecr_api;
mod ecr_proxy;
mod ecr_push;
mod engine_tcp;
mod inspect;
mod layer;
mod layer_docker;
mod push_cli;
mod registry;
mod registry_bench;
mod registry_faults;
mod registry_hostile;
mod sbom;
mod sign;
mod wordpress;
