//! Every span attribute name tokentap writes, in one place.
//!
//! Pinned: the OpenTelemetry GenAI attribute registry of semantic-conventions v1.39.0
//! (status: Development; the `opentelemetry-semantic-conventions` crate marks its GenAI
//! constants deprecated since they moved to the separate GenAI repository, hence our own
//! constants), HTTP and server attributes as stable in the same release. Attributes of
//! tokentap's own are under `tokentap.`.

pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
pub const GEN_AI_REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
pub const GEN_AI_REQUEST_TOP_P: &str = "gen_ai.request.top_p";
pub const GEN_AI_REQUEST_STREAM: &str = "gen_ai.request.stream";
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const GEN_AI_RESPONSE_ID: &str = "gen_ai.response.id";
pub const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
pub const GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: &str = "gen_ai.response.time_to_first_chunk";
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";
pub const GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: &str =
    "gen_ai.usage.cache_creation.input_tokens";
/// The API dialect of the call (`chat_completions`, `responses`, `messages`, ...).
pub const TOKENTAP_API: &str = "tokentap.api";
pub const GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: &str = "gen_ai.usage.reasoning.output_tokens";
pub const GEN_AI_INPUT_MESSAGES: &str = "gen_ai.input.messages";
pub const GEN_AI_OUTPUT_MESSAGES: &str = "gen_ai.output.messages";

pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
pub const ERROR_TYPE: &str = "error.type";
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_PATH: &str = "url.path";
pub const URL_FULL: &str = "url.full";
pub const USER_ID: &str = "user.id";
pub const SERVICE_NAME: &str = "service.name";

pub const TOKENTAP_COST_USD: &str = "tokentap.cost_usd";
pub const TOKENTAP_USAGE_ESTIMATED: &str = "tokentap.usage.estimated";
pub const TOKENTAP_WEB_SEARCHES: &str = "tokentap.web_searches";
pub const TOKENTAP_WEB_SEARCHES_SOURCE: &str = "tokentap.web_searches.source";
pub const TOKENTAP_USAGE_INJECTED: &str = "tokentap.usage.injected";
pub const TOKENTAP_BUDGET_DECISION: &str = "tokentap.budget.decision";
pub const TOKENTAP_OUTCOME: &str = "tokentap.outcome";
pub const TOKENTAP_REQUEST_ID: &str = "tokentap.request_id";

/// `gen_ai.operation.name` of a Chat Completions call.
pub const OPERATION_CHAT: &str = "chat";
