//! build (todo)
