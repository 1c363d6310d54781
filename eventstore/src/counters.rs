//! Counters in fixed windows, shared by every instance on the store: the attempt
//! limits of the API (`rate_limits`, migration `0004_rate_limits.sql`). A key is
//! whatever the caller stores (the API keeps only a keyed hash of who it counts).

use anyhow::Context as _;
use sqlx::AnyPool;

/// Counts one hit of `key` in `bucket` at `now` (Unix milliseconds) in windows of
/// `window` ms: a finished window starts again at one; otherwise one more, held at
/// one past `cap` so that refused hits do not pile up behind it. Returns the window's
/// start and its hits.
pub async fn hit(
    pool: &AnyPool,
    bucket: &str,
    key: &str,
    now: i64,
    window: i64,
    cap: i64,
) -> anyhow::Result<(i64, i64)> {
    sqlx::query_as(
        "INSERT INTO rate_limits (bucket, key, window_start, hits) VALUES ($1, $2, $3, 1)
         ON CONFLICT (bucket, key) DO UPDATE SET
           hits = CASE WHEN rate_limits.window_start <= $3 - $4 THEN 1
                       WHEN rate_limits.hits > $5 THEN $5 + 1
                       ELSE rate_limits.hits + 1 END,
           window_start = CASE WHEN rate_limits.window_start <= $3 - $4 THEN $3
                               ELSE rate_limits.window_start END
         RETURNING window_start, hits",
    )
    .bind(bucket.to_owned())
    .bind(key.to_owned())
    .bind(now)
    .bind(window)
    .bind(cap)
    .fetch_one(pool)
    .await
    .context("counting an attempt against a rate limit")
}

/// Takes one hit back from the window it was counted in (not from a later one).
pub async fn give_back(
    pool: &AnyPool,
    bucket: &str,
    key: &str,
    window_start: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE rate_limits SET hits = hits - 1
         WHERE bucket = $1 AND key = $2 AND window_start = $3 AND hits > 0",
    )
    .bind(bucket.to_owned())
    .bind(key.to_owned())
    .bind(window_start)
    .execute(pool)
    .await
    .context("giving back a rate-limited attempt")?;
    Ok(())
}

/// Forgets the window of one bucket and key.
pub async fn clear(pool: &AnyPool, bucket: &str, key: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM rate_limits WHERE bucket = $1 AND key = $2")
        .bind(bucket.to_owned())
        .bind(key.to_owned())
        .execute(pool)
        .await
        .context("clearing a rate limit")?;
    Ok(())
}

/// Forgets windows that started before `before`.
pub async fn sweep(pool: &AnyPool, before: i64) -> anyhow::Result<u64> {
    let swept = sqlx::query("DELETE FROM rate_limits WHERE window_start < $1")
        .bind(before)
        .execute(pool)
        .await
        .context("sweeping finished rate limit windows")?;
    Ok(swept.rows_affected())
}

/// Every stored key (tests check that none is in the clear).
pub async fn keys(pool: &AnyPool) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar("SELECT key FROM rate_limits")
        .fetch_all(pool)
        .await
        .context("listing rate limit keys")
}
