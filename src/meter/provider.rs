//! The one rule that names a call's provider (`gen_ai.provider.name`, OpenTelemetry's
//! well-known values): by the model's prefix (`google/gemini-…` -> `gcp.gemini`), the
//! operator's table (`[traces] providers`) over the built-in one, and a default for a model
//! without a prefix. The record carries the answer; metrics, spans and the access log show
//! the record's.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Model prefixes and what they name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Providers {
    /// Shared names: a record takes one without allocating.
    by_prefix: BTreeMap<String, Arc<str>>,
    default: Arc<str>,
    /// Anthropic's name: the provider of a Messages call whose model has no prefix.
    anthropic: Arc<str>,
}

impl Default for Providers {
    fn default() -> Self {
        Self::new(BTreeMap::new(), "openai".into())
    }
}

impl Providers {
    /// The built-in prefixes of OpenAI-compatible routers, with `extra` over them, and
    /// `default` for a model without a prefix.
    pub fn new(extra: BTreeMap<String, String>, default: String) -> Self {
        let mut by_prefix: BTreeMap<String, Arc<str>> = [
            ("openai", "openai"),
            ("anthropic", "anthropic"),
            ("google", "gcp.gemini"),
            ("x-ai", "x_ai"),
            ("xai", "x_ai"),
            ("deepseek", "deepseek"),
            ("mistralai", "mistral_ai"),
            ("mistral", "mistral_ai"),
            ("cohere", "cohere"),
            ("perplexity", "perplexity"),
            ("groq", "groq"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), Arc::from(b)))
        .collect();
        by_prefix.extend(extra.into_iter().map(|(a, b)| (a, Arc::from(b))));
        Providers {
            by_prefix,
            default: default.into(),
            anthropic: "anthropic".into(),
        }
    }

    /// The provider of a call of `api` to `model`: as [`Providers::of`], except that a
    /// Messages call (Anthropic's API) of a model without a prefix is Anthropic's.
    pub fn of_call(&self, api: super::Api, model: Option<&str>) -> Arc<str> {
        let prefixed = model
            .and_then(|m| m.split_once('/'))
            .is_some_and(|(p, _)| !p.is_empty());
        if api == super::Api::Messages && !prefixed {
            return Arc::clone(&self.anthropic);
        }
        self.of(model)
    }

    /// The provider of `model`: its prefix's name (the prefix itself when the table has
    /// none), else the default.
    pub fn of(&self, model: Option<&str>) -> Arc<str> {
        match model.and_then(|m| m.split_once('/')) {
            Some((prefix, _)) if !prefix.is_empty() => self
                .by_prefix
                .get(prefix)
                .cloned()
                .unwrap_or_else(|| prefix.into()),
            _ => Arc::clone(&self.default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_come_from_the_model_prefix() {
        let p = Providers::default();
        let of = |m| p.of(m).to_string();
        assert_eq!(of(Some("anthropic/claude-opus-4.6")), "anthropic");
        assert_eq!(of(Some("google/gemini-2.5-pro")), "gcp.gemini");
        assert_eq!(of(Some("acme/model")), "acme");
        assert_eq!(of(Some("gpt-4o")), "openai");
        assert_eq!(of(Some("/odd")), "openai");
        assert_eq!(of(None), "openai");
        let p = Providers::new(
            [("acme".to_string(), "acme_ai".to_string())].into(),
            "vllm".into(),
        );
        assert_eq!(&*p.of(Some("acme/model")), "acme_ai");
        assert_eq!(&*p.of(Some("llama-3")), "vllm");
        use crate::meter::Api;
        assert_eq!(
            &*p.of_call(Api::Messages, Some("claude-sonnet-4-5")),
            "anthropic"
        );
        assert_eq!(&*p.of_call(Api::Responses, Some("gpt-5")), "vllm");
        assert_eq!(&*p.of_call(Api::Messages, Some("acme/m")), "acme_ai");
    }
}
