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
        }
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
    }
}
