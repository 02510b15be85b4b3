//! runtime (todo)
