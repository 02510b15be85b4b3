//! wpimg's integration tests, in one binary (one link of bollard, reqwest and the AWS SDK):
//! a module per area and one set of shared helpers (`common`). Real components only: a missing
//! one fails the test, never skips it.

mod common;

mod accel;
mod assemble;
mod bad_inputs;
mod browser;
mod build;
mod cache_verify;
mod ci_jobs;
mod cli_rules;
mod ecr_api;
mod ecr_proxy;
mod ecr_push;
mod engine_tcp;
mod inspect;
mod interrupt;
mod layer;
mod layer_docker;
mod leftovers;
mod outputs;
mod platforms;
mod push_cli;
mod registry;
mod registry_bench;
mod registry_faults;
mod registry_hostile;
mod sbom;
mod secrets;
mod sign;
mod steps;
mod supply;
mod wordpress;
