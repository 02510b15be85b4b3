//! spec (todo)
