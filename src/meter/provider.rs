//! The one rule that names a call's provider (`gen_ai.provider.name`, OpenTelemetry's
//! well-known values): by the model's prefix (`google/gemini-…` -> `gcp.gemini`), the
//! operator's table (`[traces] providers`) over the built-in one, and a default for a model
//! without a prefix. The record carries the answer; metrics, spans and the access log show
//! the record's.

use std::collections::BTreeMap;

/// Model prefixes and what they name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Providers {
    by_prefix: BTreeMap<String, String>,
    default: String,
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
        let mut by_prefix: BTreeMap<String, String> = [
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
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        by_prefix.extend(extra);
        Providers { by_prefix, default }
    }

    /// The provider of `model`: its prefix's name (the prefix itself when the table has
    /// none), else the default.
    pub fn of<'a>(&'a self, model: Option<&'a str>) -> &'a str {
        match model.and_then(|m| m.split_once('/')) {
            Some((prefix, _)) if !prefix.is_empty() => {
                self.by_prefix.get(prefix).map_or(prefix, String::as_str)
            }
            _ => &self.default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_come_from_the_model_prefix() {
        let p = Providers::default();
        assert_eq!(p.of(Some("anthropic/claude-opus-4.6")), "anthropic");
        assert_eq!(p.of(Some("google/gemini-2.5-pro")), "gcp.gemini");
        assert_eq!(p.of(Some("acme/model")), "acme");
        assert_eq!(p.of(Some("gpt-4o")), "openai");
        assert_eq!(p.of(Some("/odd")), "openai");
        assert_eq!(p.of(None), "openai");
        let p = Providers::new(
            [("acme".to_string(), "acme_ai".to_string())].into(),
            "vllm".into(),
        );
        assert_eq!(p.of(Some("acme/model")), "acme_ai");
        assert_eq!(p.of(Some("llama-3")), "vllm");
    }
}
