//! XMPP accounts over REST: `PUT/DELETE /api/v1/accounts/{username}`, `GET /api/v1/accounts`.
//! Admins only. Passwords are turned into salted SCRAM-SHA-1 and SCRAM-SHA-256 credentials
//! here and never stored.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use juxta_bridge_xmpp::sasl::{DEFAULT_ITERATIONS, ScramHash, derive_keys};
use juxta_core::{Account, Principal, Username};
use serde::{Deserialize, Serialize};

use super::extract::{Auth, JsonBody};
use super::{ApiError, AppState};

/// Longest password accepted, in bytes.
const MAX_PASSWORD_BYTES: usize = 1024;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/accounts", get(list_accounts)).route(
        "/accounts/{username}",
        put(put_account).delete(delete_account),
    )
}

/// The `{username}` path parameter, checked.
pub(super) struct UserParam(Username);

impl<S: Send + Sync> FromRequestParts<S> for UserParam {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(UserParam(Username::new(&name)?))
    }
}

fn admin_only(who: &Principal) -> Result<(), ApiError> {
    if who.is_admin() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "managing accounts needs an admin credential",
        ))
    }
}

/// The new password.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordBody {
    /// 1 to 1024 bytes.
    password: String,
}

/// An account, without its credentials.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AccountView {
    username: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AccountList {
    accounts: Vec<String>,
}

#[utoipa::path(put, path = "/api/v1/accounts/{username}", tag = "accounts",
    params(("username" = String, Path, description = "The local part of the account's JID (stored lowercase)")),
    request_body = PasswordBody,
    responses((status = 201, description = "Created", body = AccountView), (status = 200, description = "Password changed", body = AccountView),
        (status = 400, description = "`invalid_username` or a bad password", body = super::problem::Problem),
        (status = 403, body = super::problem::Problem)),
    security(("bearer" = [])))]
pub(super) async fn put_account(
    State(st): State<AppState>,
    Auth(who): Auth,
    UserParam(username): UserParam,
    JsonBody(body): JsonBody<PasswordBody>,
) -> Result<Response, ApiError> {
    admin_only(&who)?;
    if body.password.is_empty() || body.password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_password",
            "the password must be 1 to 1024 bytes",
        ));
    }
    // PBKDF2 is deliberately slow: keep it off the async workers.
    let name = username.clone();
    let account = tokio::task::spawn_blocking(move || {
        let salt = || rand::random::<[u8; 16]>();
        Account {
            username: name,
            scram_sha1: derive_keys(ScramHash::Sha1, &body.password, &salt(), DEFAULT_ITERATIONS),
            scram_sha256: derive_keys(
                ScramHash::Sha256,
                &body.password,
                &salt(),
                DEFAULT_ITERATIONS,
            ),
            updated_at: juxta_core::time::now_ms(),
        }
    })
    .await
    .map_err(|e| {
        ApiError::from(juxta_core::Error::Storage(format!(
            "deriving credentials: {e}"
        )))
    })?;
    let created = st.bus.store().put_account(account).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(AccountView {
            username: username.to_string(),
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/accounts/{username}", tag = "accounts",
    params(("username" = String, Path, description = "The account")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "`account_not_found`", body = super::problem::Problem)),
    security(("bearer" = [])))]
pub(super) async fn delete_account(
    State(st): State<AppState>,
    Auth(who): Auth,
    UserParam(username): UserParam,
) -> Result<StatusCode, ApiError> {
    admin_only(&who)?;
    st.bus.store().delete_account(&username).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/accounts", tag = "accounts",
    responses((status = 200, description = "Every username", body = AccountList)),
    security(("bearer" = [])))]
pub(super) async fn list_accounts(
    State(st): State<AppState>,
    Auth(who): Auth,
) -> Result<Json<AccountList>, ApiError> {
    admin_only(&who)?;
    let accounts = st.bus.store().accounts().await?;
    Ok(Json(AccountList {
        accounts: accounts.into_iter().map(|u| u.to_string()).collect(),
    }))
}
