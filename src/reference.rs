//! Image references (temporary stub until the registry branch lands).

/// A parsed image reference.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The whole reference.
    pub raw: String,
}

/// Reference parse error.
#[derive(Debug, thiserror::Error)]
#[error("invalid reference {0:?}")]
pub struct ReferenceError(String);

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.contains(char::is_whitespace) || s.contains("//") {
            return Err(ReferenceError(s.into()));
        }
        Ok(Self { raw: s.into() })
    }
}
