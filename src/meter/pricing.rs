//! The price table: per-model prices and the rule for models it does not list.
//!
//! Prices are written in USD (per million tokens, per web search) and compiled into integer
//! pico-USD (10^-12 USD) per unit, so that every price with up to six decimals per million tokens
//! is exact and cost arithmetic never touches floating point.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Api, Pico, Usage};

/// `[pricing]` as written in the main config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// A separate TOML file with `[models."name"]` tables (relative to the config file).
    pub file: Option<PathBuf>,
    /// What to do with a model that has no price: `"unpriced"` (default) records the call with
    /// no cost and counts it; `"default"` charges `[pricing.default]`.
    #[serde(default)]
    pub unknown_model: UnknownModel,
    pub default: Option<RawModelPrice>,
    /// A cache write's price as a multiple of the input price, for models without their own
    /// `cache_write_per_mtok` (default 1.25, Anthropic's five-minute cache writes).
    pub cache_write_ratio: Option<Usd>,
    #[serde(default)]
    pub models: HashMap<String, RawModelPrice>,
}

/// The cache-write ratio when `pricing.cache_write_ratio` is not set.
const DEFAULT_CACHE_WRITE_RATIO: &str = "1.25";

/// The separate pricing file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricingFile {
    #[serde(default)]
    models: HashMap<String, RawModelPrice>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModel {
    #[default]
    Unpriced,
    Default,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPrice {
    /// USD per million input tokens that were not served from cache.
    input_per_mtok: Usd,
    /// USD per million cached input tokens; defaults to the input price.
    cached_input_per_mtok: Option<Usd>,
    /// USD per million output tokens.
    output_per_mtok: Usd,
    /// USD per million reasoning tokens when the provider prices them apart; defaults to output.
    reasoning_per_mtok: Option<Usd>,
    /// USD per million input tokens written to the cache (Anthropic's
    /// `cache_creation_input_tokens`); defaults to the input price times
    /// `pricing.cache_write_ratio`.
    cache_write_per_mtok: Option<Usd>,
    /// USD per million input tokens written to the one-hour cache; defaults to twice the input
    /// price (Anthropic's list).
    cache_write_1h_per_mtok: Option<Usd>,
    /// USD per web search the upstream ran (`usage.num_search_queries`).
    #[serde(default)]
    per_web_search: Usd,
    /// Per-search prices for the dialects that bill searches differently, by API name
    /// (`responses = 0.01`, `messages = 0.01`); the others pay `per_web_search`.
    #[serde(default)]
    per_web_search_by_api: HashMap<String, Usd>,
    /// The most output tokens the model produces in one call: the worst case a budget
    /// reserves when a request sets no max_tokens.
    max_output_tokens: Option<u64>,
}

/// A USD amount as written in the config: a TOML number or a decimal string.
#[derive(Debug, Default, Clone)]
pub struct Usd(pub String);

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            I(i64),
            F(f64),
            S(String),
        }
        Ok(Usd(match N::deserialize(d)? {
            N::I(i) => i.to_string(),
            // `{}` prints the shortest decimal that round-trips, i.e. what the operator wrote.
            N::F(f) => format!("{f}"),
            N::S(s) => s,
        }))
    }
}

/// Compiled price of one model, in pico-USD per token (or per search).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: Pico,
    pub cached_input: Pico,
    pub output: Pico,
    pub reasoning: Option<Pico>,
    pub cache_write: Pico,
    pub cache_write_1h: Pico,
    pub web_search: Pico,
    /// `per_web_search_by_api`, indexed like [`Api::ALL`].
    pub web_search_by_api: [Option<Pico>; 5],
    pub max_output_tokens: Option<u64>,
}

impl ModelPrice {
    /// The price of one web search in a call of `api`.
    pub fn web_search_in(&self, api: Option<Api>) -> Pico {
        api.and_then(|a| self.web_search_by_api[a as usize])
            .unwrap_or(self.web_search)
    }

    /// The cost of `u` in a call of `api`. Cache reads and writes are part of `prompt` and
    /// billed once, each at its own rate; reasoning tokens are part of `completion`.
    pub fn cost(&self, api: Option<Api>, u: &Usage) -> Pico {
        let cached = u.cached.min(u.prompt) as u128;
        let written = (u.cache_write as u128).min(u.prompt as u128 - cached);
        let written_1h = (u.cache_write_1h as u128).min(written);
        let uncached = u.prompt as u128 - cached - written;
        let reasoning = u.reasoning.min(u.completion) as u128;
        let mut total = uncached * self.input.0 as u128
            + cached * self.cached_input.0 as u128
            + (written - written_1h) * self.cache_write.0 as u128
            + written_1h * self.cache_write_1h.0 as u128;
        match self.reasoning {
            Some(r) => {
                total += (u.completion as u128 - reasoning) * self.output.0 as u128;
                total += reasoning * r.0 as u128;
            }
            None => total += u.completion as u128 * self.output.0 as u128,
        }
        total += u.web_searches as u128 * self.web_search_in(api).0 as u128;
        Pico(u64::try_from(total).unwrap_or(u64::MAX))
    }
}

#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: HashMap<String, ModelPrice>,
    unknown: UnknownModel,
    default: Option<ModelPrice>,
}

impl PriceTable {
    /// The price for a call, preferring the model the upstream says served it over the one the
    /// client asked for. `None` means unpriced.
    pub fn lookup(
        &self,
        response_model: Option<&str>,
        request_model: Option<&str>,
    ) -> Option<&ModelPrice> {
        response_model
            .and_then(|m| self.models.get(m))
            .or_else(|| request_model.and_then(|m| self.models.get(m)))
            .or(match self.unknown {
                UnknownModel::Default => self.default.as_ref(),
                UnknownModel::Unpriced => None,
            })
    }

    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// The most expensive price in the table (by output, then input): what a budget assumes
    /// for a model it cannot price.
    pub fn dearest(&self) -> Option<&ModelPrice> {
        self.models
            .values()
            .chain(self.default.as_ref())
            .max_by_key(|p| (p.output.0.max(p.reasoning.map_or(0, |r| r.0)), p.input.0))
    }

    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[derive(Debug)]
pub enum PricingError {
    /// An error inside an included pricing file.
    InFile { file: PathBuf, message: String },
    /// An error in the main config's `[pricing]` table.
    Here(String),
}

impl fmt::Display for PricingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PricingError::InFile { file, message } => write!(f, "{}: {message}", file.display()),
            PricingError::Here(m) => f.write_str(m),
        }
    }
}

/// Compiles `[pricing]`; also returns the included pricing file's path and text (for watching
/// and for the config hash).
pub fn compile(
    raw: &RawPricing,
    dir: &Path,
) -> Result<(PriceTable, Option<(PathBuf, String)>), PricingError> {
    let mut models = HashMap::new();
    let mut included = None;
    let ratio = raw
        .cache_write_ratio
        .as_ref()
        .map_or(DEFAULT_CACHE_WRITE_RATIO, |r| r.0.as_str());
    let ratio = decimal_scaled(ratio, 6)
        .map_err(|m| PricingError::Here(format!("pricing.cache_write_ratio: {m}")))?;
    if let Some(rel) = &raw.file {
        let path = dir.join(rel);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            PricingError::Here(format!("pricing.file: cannot read {}: {e}", path.display()))
        })?;
        let in_file = |message: String| PricingError::InFile {
            file: path.clone(),
            message,
        };
        let f: RawPricingFile =
            toml::from_str(&text).map_err(|e| in_file(crate::config::toml_error(&e, &text)))?;
        for (name, p) in &f.models {
            let key = format!("models.{name:?}");
            models.insert(
                name.clone(),
                compile_price(p, &key, ratio).map_err(in_file)?,
            );
        }
        included = Some((path, text));
    }
    // Inline prices override the file's.
    for (name, p) in &raw.models {
        let key = format!("pricing.models.{name:?}");
        models.insert(
            name.clone(),
            compile_price(p, &key, ratio).map_err(PricingError::Here)?,
        );
    }
    let default = match &raw.default {
        Some(p) => Some(compile_price(p, "pricing.default", ratio).map_err(PricingError::Here)?),
        None => None,
    };
    if raw.unknown_model == UnknownModel::Default && default.is_none() {
        return Err(PricingError::Here(
            "pricing.unknown_model = \"default\" needs a [pricing.default] table with the price to charge".into(),
        ));
    }
    Ok((
        PriceTable {
            models,
            unknown: raw.unknown_model,
            default,
        },
        included,
    ))
}

/// `ratio`: the cache-write ratio in millionths (1.25 is 1_250_000).
fn compile_price(p: &RawModelPrice, key: &str, ratio: u64) -> Result<ModelPrice, String> {
    // USD per million tokens -> pico-USD per token: multiply by 10^12 / 10^6 = 10^6.
    let per_tok =
        |field: &str, v: &Usd| decimal_scaled(&v.0, 6).map_err(|m| format!("{key}.{field}: {m}"));
    let input = per_tok("input_per_mtok", &p.input_per_mtok)?;
    let output = per_tok("output_per_mtok", &p.output_per_mtok)?;
    let cached_input = match &p.cached_input_per_mtok {
        Some(v) => per_tok("cached_input_per_mtok", v)?,
        None => input,
    };
    let reasoning = match &p.reasoning_per_mtok {
        Some(v) => Some(per_tok("reasoning_per_mtok", v)?),
        None => None,
    };
    let cache_write = match &p.cache_write_per_mtok {
        Some(v) => per_tok("cache_write_per_mtok", v)?,
        None => u64::try_from(input as u128 * ratio as u128 / 1_000_000)
            .map_err(|_| format!("{key}: the cache-write price is too large"))?,
    };
    let cache_write_1h = match &p.cache_write_1h_per_mtok {
        Some(v) => per_tok("cache_write_1h_per_mtok", v)?,
        None => input.saturating_mul(2),
    };
    let web_search = if p.per_web_search.0.is_empty() {
        0
    } else {
        decimal_scaled(&p.per_web_search.0, 12).map_err(|m| format!("{key}.per_web_search: {m}"))?
    };
    let mut web_search_by_api = [None; 5];
    for (name, v) in &p.per_web_search_by_api {
        let api = Api::from_name(name).ok_or_else(|| {
            format!(
                "{key}.per_web_search_by_api: unknown API {name:?} (one of chat_completions, \
                 responses, messages, embeddings, completions)"
            )
        })?;
        web_search_by_api[api as usize] =
            Some(Pico(decimal_scaled(&v.0, 12).map_err(|m| {
                format!("{key}.per_web_search_by_api.{name}: {m}")
            })?));
    }
    Ok(ModelPrice {
        input: Pico(input),
        cached_input: Pico(cached_input),
        output: Pico(output),
        reasoning: reasoning.map(Pico),
        cache_write: Pico(cache_write),
        cache_write_1h: Pico(cache_write_1h),
        web_search: Pico(web_search),
        web_search_by_api,
        max_output_tokens: p.max_output_tokens,
    })
}

/// A USD amount written as a decimal ("12.50") in exact pico-USD.
pub fn usd_to_pico(s: &str) -> Result<Pico, String> {
    decimal_scaled(s, 12).map(Pico)
}

/// Parses a non-negative decimal like "2.50" exactly into `value * 10^scale` as an integer.
fn decimal_scaled(s: &str, scale: u32) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a non-negative decimal number like 2.50");
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize {
        return Err(format!(
            "{s:?} has more than {scale} decimal places, which tokentap cannot represent exactly"
        ));
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    f *= 10u64.pow(scale - frac.len() as u32);
    int.checked_mul(10u64.pow(scale))
        .and_then(|v| v.checked_add(f))
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml_text: &str) -> Result<PriceTable, PricingError> {
        #[derive(Deserialize)]
        struct W {
            pricing: RawPricing,
        }
        let w: W = toml::from_str(toml_text).unwrap();
        compile(&w.pricing, Path::new(".")).map(|(t, _)| t)
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal_scaled("2.50", 6), Ok(2_500_000));
        assert_eq!(decimal_scaled("0.0375", 6), Ok(37_500));
        assert_eq!(decimal_scaled("15", 6), Ok(15_000_000));
        assert_eq!(decimal_scaled(".5", 6), Ok(500_000));
        assert!(decimal_scaled("0.0000001", 6).is_err());
        assert!(decimal_scaled("-1", 6).is_err());
        assert!(decimal_scaled("1e3", 6).is_err());
        assert!(decimal_scaled("", 6).is_err());
    }

    #[test]
    fn cached_tokens_are_billed_once_at_the_cached_rate() {
        let t = table(
            r#"[pricing.models.m]
input_per_mtok = 3.0
cached_input_per_mtok = 0.3
output_per_mtok = 15
per_web_search = 0.01
"#,
        )
        .unwrap();
        let p = t.get("m").unwrap();
        let u = Usage {
            prompt: 1000,
            completion: 100,
            cached: 800,
            cache_write: 0,
            cache_write_1h: 0,
            reasoning: 0,
            web_searches: 2,
        };
        // 200 * 3e-6 + 800 * 0.3e-6 + 100 * 15e-6 + 2 * 0.01 USD
        let expect_usd = 200.0 * 3e-6 + 800.0 * 0.3e-6 + 100.0 * 15e-6 + 0.02;
        assert_eq!(p.cost(None, &u).0, (expect_usd * 1e12f64).round() as u64);
        assert_eq!(
            p.cost(None, &u).0,
            600_000_000 + 240_000_000 + 1_500_000_000 + 20_000_000_000
        );
    }

    #[test]
    fn reasoning_priced_apart_only_when_configured() {
        let t = table(
            "[pricing.models.a]\ninput_per_mtok = 1\noutput_per_mtok = 10\n\
             [pricing.models.b]\ninput_per_mtok = 1\noutput_per_mtok = 10\nreasoning_per_mtok = 20\n",
        )
        .unwrap();
        let u = Usage {
            prompt: 0,
            completion: 10,
            reasoning: 4,
            ..Usage::default()
        };
        assert_eq!(t.get("a").unwrap().cost(None, &u).0, 100_000_000);
        assert_eq!(
            t.get("b").unwrap().cost(None, &u).0,
            6 * 10_000_000 + 4 * 20_000_000
        );
    }

    #[test]
    fn cache_writes_are_billed_once_at_their_own_rate() {
        let t = table(
            "[pricing.models.a]\ninput_per_mtok = 3\ncached_input_per_mtok = 0.3\noutput_per_mtok = 15\n\
             [pricing.models.b]\ninput_per_mtok = 3\noutput_per_mtok = 15\ncache_write_per_mtok = 6\n\
             [pricing.models.c]\ninput_per_mtok = 3\noutput_per_mtok = 15\nper_web_search = 0.005\n\
             per_web_search_by_api = { messages = 0.01 }\n",
        )
        .unwrap();
        // 1000 input tokens: 600 cache reads, 300 cache writes, 100 plain.
        let u = Usage {
            prompt: 1000,
            cached: 600,
            cache_write: 300,
            cache_write_1h: 0,
            ..Usage::default()
        };
        // The default ratio: 1.25 x 3 USD/MTok.
        assert_eq!(
            t.get("a").unwrap().cost(None, &u).0,
            100 * 3_000_000 + 600 * 300_000 + 300 * 3_750_000
        );
        assert_eq!(
            t.get("b").unwrap().cost(None, &u).0,
            100 * 3_000_000 + 600 * 3_000_000 + 300 * 6_000_000
        );
        // Of the writes, 100 kept for an hour: twice the input price.
        let u1h = Usage {
            cache_write_1h: 100,
            ..u
        };
        assert_eq!(
            t.get("a").unwrap().cost(None, &u1h).0,
            100 * 3_000_000 + 600 * 300_000 + 200 * 3_750_000 + 100 * 6_000_000
        );
        let s = Usage {
            web_searches: 2,
            ..Usage::default()
        };
        let c = t.get("c").unwrap();
        assert_eq!(c.cost(Some(Api::Messages), &s).0, 2 * 10_000_000_000);
        assert_eq!(c.cost(Some(Api::Responses), &s).0, 2 * 5_000_000_000);
        assert_eq!(c.cost(None, &s).0, 2 * 5_000_000_000);
        let e = table(
            "[pricing.models.d]\ninput_per_mtok = 1\noutput_per_mtok = 1\nper_web_search_by_api = { chat = 1 }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown API \"chat\""), "{e}");
    }

    #[test]
    fn unknown_model_rule() {
        let t = table("[pricing]\nunknown_model = \"unpriced\"\n").unwrap();
        assert!(t.lookup(Some("x"), Some("x")).is_none());
        assert!(table("[pricing]\nunknown_model = \"default\"\n").is_err());
        let t = table(
            "[pricing]\nunknown_model = \"default\"\n[pricing.default]\ninput_per_mtok = 1\noutput_per_mtok = 2\n",
        )
        .unwrap();
        assert_eq!(t.lookup(None, Some("x")).unwrap().output.0, 2_000_000);
    }

    #[test]
    fn response_model_wins_over_request_model() {
        let t = table(
            "[pricing.models.a]\ninput_per_mtok = 1\noutput_per_mtok = 1\n\
             [pricing.models.b]\ninput_per_mtok = 2\noutput_per_mtok = 2\n",
        )
        .unwrap();
        assert_eq!(t.lookup(Some("b"), Some("a")).unwrap().input.0, 2_000_000);
        assert_eq!(t.lookup(Some("zzz"), Some("a")).unwrap().input.0, 1_000_000);
    }

    #[test]
    fn bad_price_names_the_key() {
        let e = table("[pricing.models.\"x/y\"]\ninput_per_mtok = \"abc\"\noutput_per_mtok = 1\n")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("pricing.models.\"x/y\".input_per_mtok"),
            "{e}"
        );
    }
}
