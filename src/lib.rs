//! wpimg: build container images from image.yaml with Ansible, assemble OCI images natively,
//! and push them to any OCI registry or Amazon ECR.
#![warn(missing_docs)]

pub mod auth;
pub mod build;
pub mod cli;
pub mod ecr;
pub mod error;
pub mod events;
pub mod inspect;
pub mod layer;
pub mod layout;
pub mod leftovers;
pub mod oci;
pub mod outputs;
pub mod provenance;
pub mod provision;
pub mod publish;
pub mod reference;
pub mod registry;
pub mod runtime;
pub mod sbom;
pub mod secrets;
pub mod sign;
pub mod spec;
pub mod supply;
