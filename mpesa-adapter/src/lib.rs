//! M-Pesa through Safaricom's Daraja API.
//!
//! - [`daraja`]: the client (OAuth token cache, STK Push, STK Push Query) and the
//!   STK Push password and timestamp.
//! - [`callback`]: the STK callback Daraja posts, parsed.
//! - [`sandbox`]: a local Daraja (the `daraja-sandbox` binary) that speaks the same
//!   endpoints and JSON, checks credentials, token and password, and delivers the STK
//!   callback with a configurable outcome.
//! - [`worker`]: the log consumer that lists requested payments and the worker that
//!   pushes each at most once and reconciles those whose callback is late.

pub mod callback;
pub mod daraja;
pub mod sandbox;
pub mod worker;
