//! auth (todo)
