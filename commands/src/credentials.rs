//! Password hashing with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, one
//! lane, as OWASP recommends). Hashing is deliberately slow, so it runs on the blocking
//! pool, never on the async workers.

use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use domain::value::Password;

/// The PHC string (`$argon2id$v=19$…`) of `password`, with a fresh random salt.
pub async fn hash_password(password: &Password) -> anyhow::Result<String> {
    let password = password.clone();
    tokio::task::spawn_blocking(move || hash_now(password.expose()))
        .await
        .context("password hashing task")?
}

/// Whether `password` matches the PHC string `phc`.
pub async fn verify_password(phc: String, password: &Password) -> bool {
    let password = password.clone();
    tokio::task::spawn_blocking(move || verify_now(&phc, password.expose()))
        .await
        .unwrap_or(false)
}

/// Spends the time of one verification when there is no account, so a failed sign-in
/// takes as long whether or not the phone number is registered.
pub async fn verify_nothing(password: &Password) {
    let password = password.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(phc) = decoy() {
            let _ = verify_now(phc, password.expose());
        }
    })
    .await;
}

fn hash_now(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| anyhow!("hashing a password: {e}"))
}

fn verify_now(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

fn decoy() -> Option<&'static str> {
    static DECOY: OnceLock<Option<String>> = OnceLock::new();
    DECOY
        .get_or_init(|| hash_now("decoy password that matches nothing").ok())
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only_and_holds_no_plaintext() {
        let password = Password::parse("kilimanjaro 5895").unwrap();
        let phc = hash_password(&password).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(!phc.contains("kilimanjaro"));
        assert!(verify_password(phc.clone(), &password).await);
        let other = Password::parse("kilimanjaro 5896").unwrap();
        assert!(!verify_password(phc.clone(), &other).await);
        assert!(!verify_password("not a hash".into(), &password).await);
        // Same password, fresh salt: another hash.
        assert_ne!(hash_password(&password).await.unwrap(), phc);
    }
}
