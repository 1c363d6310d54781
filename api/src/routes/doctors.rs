//! The registrar's view of doctors: who is waiting for verification.

use actix_web::web::{Data, Query};
use actix_web::HttpResponse;
use projections::queries;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::extract::Caller;
use crate::problem::Problem;
use crate::routes::{registrar, PageQuery};
use crate::server::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DoctorQuery {
    /// unverified, verified or suspended (default: all).
    pub status: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DoctorItem {
    pub doctor_id: Uuid,
    /// As registered (`null` once the doctor's key is erased); never the phone.
    pub name: Option<String>,
    pub licence: String,
    pub status: String,
    pub registered_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DoctorPage {
    pub items: Vec<DoctorItem>,
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/doctors", tag = "accounts",
    params(DoctorQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Doctors by status, oldest registration first: `status=unverified` is the verification queue (registrars)", body = DoctorPage)))]
#[tracing::instrument(skip_all)]
pub async fn list(
    state: Data<AppState>,
    caller: Caller,
    query: Query<DoctorQuery>,
) -> Result<HttpResponse, Problem> {
    registrar(&caller)?;
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(s @ ("unverified" | "verified" | "suspended")) => Some(s),
        Some(_) => {
            return Err(Problem::field(
                "status",
                "must be unverified, verified or suspended",
            ))
        }
    };
    let (after, limit) = PageQuery {
        cursor: query.cursor.clone(),
        limit: query.limit.clone(),
    }
    .parse()?;
    let page = queries::doctor_profiles(state.store.any_pool(), status, after, limit).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for row in page.items {
        items.push(DoctorItem {
            doctor_id: Uuid::parse_str(&row.doctor_id).unwrap_or_default(),
            name: state
                .commands
                .doctor_name(&row.doctor_id, &row.personal_sealed)
                .await,
            licence: row.licence,
            status: row.status,
            registered_at: row.registered_at,
        });
    }
    Ok(HttpResponse::Ok().json(DoctorPage {
        items,
        next_cursor: page.next_cursor,
    }))
}
