//! The audit trail for auditors: the log ranges anchored on chain.

use actix_web::web::{Data, Query};
use actix_web::HttpResponse;
use domain::actor::Actor;
use projections::queries;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::extract::Caller;
use crate::problem::Problem;
use crate::routes::PageQuery;
use crate::server::AppState;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnchorItem {
    /// First and last log ordinal of the range (1-based, in log order).
    pub from: i64,
    pub to: i64,
    /// Merkle root of the range's events (keccak-256), `0x…`.
    pub root: String,
    pub chain_id: i64,
    /// The audit anchor contract.
    pub contract: String,
    pub tx_hash: String,
    pub block: i64,
    pub anchored_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnchorPage {
    pub items: Vec<AnchorItem>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit/anchors", tag = "audit",
    params(PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Log ranges whose Merkle roots are anchored on chain (auditors and registrars); `afyachain audit verify` recomputes them", body = AnchorPage)))]
#[tracing::instrument(skip_all)]
pub async fn anchors(
    state: Data<AppState>,
    caller: Caller,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    if !matches!(caller.actor(), Actor::Auditor(_) | Actor::Registrar(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only auditors and registrars see the audit anchors",
        ));
    }
    let (after, limit) = query.parse()?;
    let page = queries::anchors(state.store.any_pool(), after, limit).await?;
    Ok(HttpResponse::Ok().json(AnchorPage {
        items: page
            .items
            .into_iter()
            .map(|a| AnchorItem {
                from: a.from_ordinal,
                to: a.to_ordinal,
                root: a.root,
                chain_id: a.chain_id,
                contract: a.contract,
                tx_hash: a.tx_hash,
                block: a.block,
                anchored_at: a.anchored_at,
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}
