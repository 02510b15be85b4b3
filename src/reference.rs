//! reference (todo)
