//! Ciphertext in events: personal fields and wrapped keys. The domain only carries it;
//! the write side seals and opens it.

use serde::{Deserialize, Serialize};

macro_rules! ciphertext_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps ciphertext produced by the write side.
            pub fn from_ciphertext(ciphertext: String) -> Self {
                Self(ciphertext)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        // Never print ciphertext either: logs carry ids only.
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "(<{} bytes>)"), self.0.len())
            }
        }
    };
}

ciphertext_type!(
    /// A personal field (or several) sealed under the subject's key.
    Sealed
);
ciphertext_type!(
    /// A record's data key, sealed under the patient's key.
    WrappedKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_debug_prints_only_its_length() {
        let sealed = Sealed::from_ciphertext("v1.c2VjcmV0".into());
        assert_eq!(format!("{sealed:?}"), "Sealed(<11 bytes>)");
    }
}
