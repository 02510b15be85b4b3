//! provision (todo)
