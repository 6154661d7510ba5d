//! `GET /v1/models` and `GET /v1/models/{model}`.

use hyper::StatusCode;

use super::error::ApiError;
use super::responses::{self, ModelList, ModelObject};
use super::{AppState, Handled};

pub fn model_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/models/").filter(|m| !m.is_empty())
}

fn model_object(state: &AppState) -> ModelObject<'_> {
    ModelObject {
        id: &state.model.name,
        object: "model",
        created: state.model.created,
        owned_by: "bulwark",
        max_model_len: state.model.context_length,
    }
}

pub fn list(state: &AppState) -> Handled {
    let list = ModelList {
        object: "list",
        data: [model_object(state)],
    };
    Handled::json(StatusCode::OK, &responses::to_value(&list), (0, 0))
}

pub fn get(state: &AppState, path: &str) -> Result<Handled, ApiError> {
    let requested = model_path(path).unwrap_or_default();
    if requested != state.model.name {
        return Err(ApiError::ModelNotFound {
            model: requested.chars().take(128).collect(),
        });
    }
    Ok(Handled::json(
        StatusCode::OK,
        &responses::to_value(&model_object(state)),
        (0, 0),
    ))
}
