//! layer (todo)
