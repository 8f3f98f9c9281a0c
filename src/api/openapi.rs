//! The OpenAPI 3.1 description of the v1 API, generated from the handlers' own annotations and request types,
//! served at `/openapi.json`.

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// An RFC 9457 problem details body, as every error answers.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProblemDoc {
    #[schema(example = "/problems/validation-error")]
    r#type: String,
    title: String,
    status: u16,
    detail: String,
    errors: Option<Vec<FieldErrorDoc>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FieldErrorDoc {
    field: String,
    message: String,
}

struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A cpis API key"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "cpis", description = "Child protection information sharing: plans, flag checks, attendances, notifications, audit"),
    paths(
        super::health::live,
        super::health::ready,
        super::health::metrics,
        super::keys::create,
        super::keys::revoke,
        super::organisations::upsert,
        super::organisations::read,
        super::notifications::put_delivery,
        super::notifications::list,
        super::notifications::read,
        super::notifications::redeliver,
        super::plans::register,
        super::plans::read,
        super::plans::patch,
        super::plans::search,
        super::plans::bulk,
        super::flag_checks::check,
        super::attendances::create,
        super::mpi::link,
        super::mpi::resolve,
        super::audit::search,
        super::audit::verify,
    ),
    components(schemas(ProblemDoc, FieldErrorDoc)),
    modifiers(&BearerKeys)
)]
pub struct ApiDoc;

pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(ApiDoc::openapi().to_pretty_json().unwrap_or_default())
}
