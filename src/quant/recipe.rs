//! Quantization recipes: which level, which method, which group size and which weights to skip, parsed from the
//! names users write (`int4`, `fp8`, `hqq`, ...) and validated once so that every later stage can trust them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A quantization level: the storage format of the weights (and, for `int8-dyn`, of the activations at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum Level {
    /// Float32 weights, no quantization: the baseline every other level is compared with.
    #[serde(rename = "f32")]
    F32,
    /// IEEE half precision weights.
    #[serde(rename = "f16")]
    F16,
    /// bfloat16 weights.
    #[serde(rename = "bf16")]
    Bf16,
    /// OCP float8 e4m3fn (max 448) with one float32 scale per output channel.
    #[serde(rename = "f8")]
    F8E4m3,
    /// OCP float8 e5m2 (max 57344) with one float32 scale per output channel.
    #[serde(rename = "f8e5m2")]
    F8E5m2,
    /// 8-bit integer weights.
    #[serde(rename = "int8")]
    Int8,
    /// 8-bit integer weights and dynamic per-row int8 activation quantization at run time.
    #[serde(rename = "int8-dyn")]
    Int8Dyn,
    /// 4-bit integer weights, two per byte.
    #[serde(rename = "int4")]
    Int4,
    /// 2-bit integer weights, four per byte.
    #[serde(rename = "int2")]
    Int2,
}

impl Level {
    /// Every level, in the order reports list them.
    pub const ALL: [Level; 9] = [
        Level::F32,
        Level::F16,
        Level::Bf16,
        Level::F8E4m3,
        Level::F8E5m2,
        Level::Int8,
        Level::Int8Dyn,
        Level::Int4,
        Level::Int2,
    ];

    /// Parses a level as users write it; aliases: `float8`, `fp8`, `f8e4m3`, `f8e4m3fn` for `f8`.
    pub fn parse(text: &str) -> Result<Level> {
        let level = match text.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Level::F32,
            "f16" | "fp16" | "float16" => Level::F16,
            "bf16" | "bfloat16" => Level::Bf16,
            "f8" | "fp8" | "float8" | "f8e4m3" | "f8e4m3fn" | "float8_e4m3fn" => Level::F8E4m3,
            "f8e5m2" | "fp8e5m2" | "float8_e5m2" => Level::F8E5m2,
            "int8" | "i8" | "qint8" => Level::Int8,
            "int8-dyn" | "int8dyn" | "int8_dyn" => Level::Int8Dyn,
            "int4" | "i4" | "qint4" => Level::Int4,
            "int2" | "i2" | "qint2" => Level::Int2,
            other => {
                return Err(Error::unsupported(
                    format!("quantization level '{other}'"),
                    format!(
                        "unknown quantization level '{other}': expected one of f32, f16, bf16, f8 (float8, fp8, \
                         f8e4m3), f8e5m2, int8, int8-dyn, int4, int2"
                    ),
                ));
            }
        };
        Ok(level)
    }

    /// Parses a comma-separated list such as `f32,int8,int4`; empty items are errors.
    pub fn parse_list(text: &str) -> Result<Vec<Level>> {
        text.split(',').map(Level::parse).collect()
    }

    /// The canonical short name, the one `parse` maps every alias to.
    pub fn name(self) -> &'static str {
        match self {
            Level::F32 => "f32",
            Level::F16 => "f16",
            Level::Bf16 => "bf16",
            Level::F8E4m3 => "f8",
            Level::F8E5m2 => "f8e5m2",
            Level::Int8 => "int8",
            Level::Int8Dyn => "int8-dyn",
            Level::Int4 => "int4",
            Level::Int2 => "int2",
        }
    }

    /// True for `f32`, the unquantized baseline.
    pub fn is_float_baseline(self) -> bool {
        self == Level::F32
    }

    /// True when activations are quantized at run time too (`int8-dyn`).
    pub fn dynamic_activations(self) -> bool {
        self == Level::Int8Dyn
    }

    /// Bits of an integer level's codes; `None` for float levels.
    pub fn int_bits(self) -> Option<u32> {
        match self {
            Level::Int8 | Level::Int8Dyn => Some(8),
            Level::Int4 => Some(4),
            Level::Int2 => Some(2),
            _ => None,
        }
    }

    /// Group size used when the recipe names none: 64 for int4, 32 for int2, per channel otherwise.
    pub fn default_group_size(self) -> Option<usize> {
        match self {
            Level::Int4 => Some(64),
            Level::Int2 => Some(32),
            _ => None,
        }
    }
}

impl std::str::FromStr for Level {
    type Err = Error;
    fn from_str(text: &str) -> Result<Level> {
        Level::parse(text)
    }
}

/// Deserialized through [`Level::parse`], so flags, segq.toml, checkpoints and results accept the same spellings.
impl TryFrom<String> for Level {
    type Error = Error;
    fn try_from(text: String) -> Result<Level> {
        Level::parse(&text)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the codes, scales and zero points of a weight are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Method {
    /// Round to nearest: absmax (symmetric) or min/max (affine) statistics, no search.
    Rtn,
    /// Calibration-free half-quadratic optimisation of scale and zero point per group (Badri & Shaji 2023).
    Hqq,
}

impl Method {
    /// Parses a method as users write it (`rtn`, `hqq`).
    pub fn parse(text: &str) -> Result<Method> {
        match text.trim().to_ascii_lowercase().as_str() {
            "rtn" | "minmax" | "round" => Ok(Method::Rtn),
            "hqq" => Ok(Method::Hqq),
            other => Err(Error::unsupported(
                format!("quantization method '{other}'"),
                format!("unknown quantization method '{other}': expected rtn or hqq"),
            )),
        }
    }

    /// The canonical short name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Hqq => "hqq",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(text: &str) -> Result<Method> {
        Method::parse(text)
    }
}

impl TryFrom<String> for Method {
    type Error = Error;
    fn try_from(text: String) -> Result<Method> {
        Method::parse(&text)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A requested level that no requested method can build, with the reason; it is reported as a failed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnbuildableLevel {
    pub level: Level,
    pub reason: String,
}

/// What a sweep asks for: levels x methods with one group size, symmetry and skip list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepSpec<'a> {
    pub levels: &'a [Level],
    pub methods: &'a [Method],
    pub group_size: Option<usize>,
    pub symmetric: Option<bool>,
    pub skip: &'a [String],
}

impl SweepSpec<'_> {
    /// The recipes of the sweep: f32 first (always: it is every other level's reference), then each requested
    /// level with each method that applies to it (f16/bf16/f8 take rtn only), without duplicates. Combinations a
    /// level cannot use are left out with a notice when other methods remain for it; when none applies, the level
    /// is returned as [`UnbuildableLevel`] with the reasons.
    pub fn recipes(&self) -> Vec<std::result::Result<Recipe, UnbuildableLevel>> {
        let mut out = vec![Ok(Recipe::level_default(Level::F32))];
        let mut seen = vec![Recipe::level_default(Level::F32).label()];
        // Combinations left out, by method and reason, so each reason is said once for all its levels.
        let mut left_out: Vec<(Method, String, Vec<&str>)> = Vec::new();
        for &level in self.levels {
            if level.is_float_baseline() {
                continue;
            }
            let mut built = Vec::new();
            let mut errors = Vec::new();
            for &method in self.methods {
                match Recipe::new(level, method, self.group_size, self.symmetric, self.skip.to_vec()) {
                    Ok(r) => built.push(r),
                    Err(e) => errors.push((method, e.to_string())),
                }
            }
            if built.is_empty() {
                out.push(Err(UnbuildableLevel {
                    level,
                    reason: errors.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("; "),
                }));
                continue;
            }
            for (method, e) in errors {
                // "level f16, method hqq: <reason>" -> the reason, shared by every level it applies to.
                let reason = e.split_once(": ").map_or(e.clone(), |(_, r)| r.to_string());
                match left_out.iter_mut().find(|(m, r, _)| *m == method && *r == reason) {
                    Some((_, _, levels)) => levels.push(level.name()),
                    None => left_out.push((method, reason, vec![level.name()])),
                }
            }
            for r in built {
                let label = r.label();
                if !seen.contains(&label) {
                    seen.push(label);
                    out.push(Ok(r));
                }
            }
        }
        for (method, reason, levels) in left_out {
            tracing::info!("{} evaluated without {method} ({reason})", levels.join(", "));
        }
        out
    }
}

/// A validated quantization recipe. Build it with [`Recipe::new`]; the fields are public for reading and for
/// serde, and [`Recipe::validate`] re-checks a deserialized one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    pub level: Level,
    pub method: Method,
    /// Elements per group along a row; `None` means the level's default (per channel when it has none).
    pub group_size: Option<usize>,
    /// Symmetric (no zero point) or affine; `None` means the level's and method's default.
    pub symmetric: Option<bool>,
    /// Glob patterns over weight names that stay float (e.g. `decode_head.classifier*`).
    pub skip: Vec<String>,
}

impl Recipe {
    /// Builds and validates a recipe; every invalid combination is a one-line error.
    pub fn new(
        level: Level,
        method: Method,
        group_size: Option<usize>,
        symmetric: Option<bool>,
        skip: Vec<String>,
    ) -> Result<Recipe> {
        let recipe = Recipe {
            level,
            method,
            group_size,
            symmetric,
            skip,
        };
        recipe.validate()?;
        Ok(recipe)
    }

    /// The plain recipe of a level: its default method (rtn), group size and symmetry, nothing skipped.
    pub fn level_default(level: Level) -> Recipe {
        Recipe {
            level,
            method: Method::Rtn,
            group_size: None,
            symmetric: None,
            skip: Vec::new(),
        }
    }

    /// Checks the combination of level, method, group size, symmetry and skip patterns.
    pub fn validate(&self) -> Result<()> {
        let level = self.level;
        let label = format!("level {level}, method {}", self.method);
        if self.group_size == Some(0) {
            return Err(Error::invalid(
                label,
                "group size 0 is invalid (use a positive number of elements)",
            ));
        }
        match level.int_bits() {
            None => {
                if let Some(g) = self.group_size {
                    return Err(Error::unsupported(
                        label,
                        format!(
                            "group size {g} is not supported for float levels (f8 has one scale per output channel)"
                        ),
                    ));
                }
                if self.symmetric == Some(false) {
                    return Err(Error::unsupported(
                        label,
                        "float levels have no zero point (affine is int only)",
                    ));
                }
                if self.method != Method::Rtn {
                    return Err(Error::unsupported(
                        label,
                        format!(
                            "{} applies to integer levels only; float levels are cast (use rtn)",
                            self.method
                        ),
                    ));
                }
            }
            Some(_) => {
                // The W8A8 kernels multiply int8 activations by symmetric per-channel int8 codes; any other weight
                // would fall back to dequantizing with float activations: weight-only int8 under the int8-dyn name.
                if level.dynamic_activations() {
                    let why = if self.method == Method::Hqq {
                        Some("hqq weights are affine (they have a zero point)".to_string())
                    } else if self.symmetric == Some(false) {
                        Some("affine weights (symmetric = false) have a zero point".to_string())
                    } else {
                        self.group_size
                            .map(|g| format!("group size {g} gives several scales per output channel"))
                    };
                    if let Some(why) = why {
                        return Err(Error::unsupported(
                            label,
                            format!(
                                "int8-dyn multiplies int8 activations by symmetric int8 weights with one scale per \
                                 output channel; {why}, so it would run weight-only: use int8-dyn with rtn and no \
                                 group size, or int8 with {}",
                                self.method
                            ),
                        ));
                    }
                }
                if self.method == Method::Hqq && self.symmetric == Some(true) {
                    return Err(Error::unsupported(
                        label,
                        "hqq optimises a zero point and needs affine quantization (drop symmetric=true)",
                    ));
                }
            }
        }
        for pattern in &self.skip {
            glob::Pattern::new(pattern)
                .map_err(|e| Error::config("skip", format!("skip pattern '{pattern}' is not a valid glob: {e}")))?;
        }
        Ok(())
    }

    /// Whether weights are stored without zero point: int8 with rtn is symmetric by default (absmax per channel),
    /// int4/int2 and every hqq recipe are affine; float levels are always symmetric (scale only).
    pub fn is_symmetric(&self) -> bool {
        match self.level.int_bits() {
            None => true,
            Some(8) => self.symmetric.unwrap_or(self.method == Method::Rtn),
            Some(_) => self.symmetric.unwrap_or(false),
        }
    }

    /// The requested group size (explicit or the level's default); `None` is per channel.
    pub fn requested_group_size(&self) -> Option<usize> {
        self.group_size.or(self.level.default_group_size())
    }

    /// The group size actually used on rows of `cols` elements: rows no longer than the group are quantized per
    /// channel (one group per row, e.g. depthwise [C, 9]); longer rows are cut into groups of `g` with a shorter
    /// trailing group when `g` does not divide the row.
    pub fn effective_group_size(&self, cols: usize) -> usize {
        match self.requested_group_size() {
            Some(g) if g < cols => g,
            _ => cols.max(1),
        }
    }

    /// A short stable name such as `f32`, `f8`, `int8-rtn`, `int8-dyn-rtn`, `int4-hqq-g64`, `int4-rtn-g64-sym`.
    pub fn label(&self) -> String {
        let level = self.level;
        let Some(bits) = level.int_bits() else {
            return level.name().to_string();
        };
        let mut label = format!("{}-{}", level.name(), self.method.name());
        if let Some(g) = self.requested_group_size() {
            label.push_str(&format!("-g{g}"));
        }
        let default_symmetric = bits == 8 && self.method == Method::Rtn;
        match (self.is_symmetric(), default_symmetric) {
            (true, false) => label.push_str("-sym"),
            (false, true) => label.push_str("-asym"),
            _ => {}
        }
        label
    }

    /// True when the weight named `weight_name` matches a skip pattern and must stay float.
    pub fn skips(&self, weight_name: &str) -> bool {
        self.skip
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .any(|p| p.matches(weight_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_with_aliases() {
        for alias in ["f8", "float8", "fp8", "f8e4m3", "F8E4M3FN"] {
            assert_eq!(Level::parse(alias).unwrap(), Level::F8E4m3, "{alias}");
        }
        assert_eq!(Level::parse("f8e5m2").unwrap(), Level::F8E5m2);
        assert_eq!(Level::parse(" int8-dyn ").unwrap(), Level::Int8Dyn);
        assert_eq!(
            Level::parse_list("f32,f16,bf16,int8,int4,int2").unwrap(),
            vec![
                Level::F32,
                Level::F16,
                Level::Bf16,
                Level::Int8,
                Level::Int4,
                Level::Int2
            ]
        );
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()).unwrap(), level);
        }
        let err = Level::parse("int3").unwrap_err().to_string();
        assert!(err.contains("unknown quantization level 'int3'"), "{err}");
        assert!(Level::parse_list("int8,,int4").is_err());
        assert!(Level::F32.is_float_baseline() && !Level::F16.is_float_baseline());
        assert!(Level::Int8Dyn.dynamic_activations() && !Level::Int8.dynamic_activations());
        assert_eq!(Method::parse("HQQ").unwrap(), Method::Hqq);
        assert!(Method::parse("gptq").unwrap_err().to_string().contains("'gptq'"));
    }

    #[test]
    fn labels_are_short_and_stable() {
        let label = |level, method, g, sym| Recipe::new(level, method, g, sym, vec![]).unwrap().label();
        assert_eq!(label(Level::F32, Method::Rtn, None, None), "f32");
        assert_eq!(label(Level::F8E4m3, Method::Rtn, None, None), "f8");
        assert_eq!(label(Level::Int8, Method::Rtn, None, None), "int8-rtn");
        assert_eq!(label(Level::Int8Dyn, Method::Rtn, None, None), "int8-dyn-rtn");
        assert_eq!(label(Level::Int8, Method::Hqq, None, None), "int8-hqq");
        assert_eq!(
            label(Level::Int8, Method::Rtn, Some(128), Some(false)),
            "int8-rtn-g128-asym"
        );
        assert_eq!(label(Level::Int4, Method::Hqq, None, None), "int4-hqq-g64");
        assert_eq!(
            label(Level::Int4, Method::Rtn, Some(128), Some(true)),
            "int4-rtn-g128-sym"
        );
        assert_eq!(label(Level::Int2, Method::Rtn, None, None), "int2-rtn-g32");
    }

    #[test]
    fn bad_recipes_are_rejected_with_one_line_messages() {
        let err = |level, method, g, sym: Option<bool>, skip: Vec<String>| {
            Recipe::new(level, method, g, sym, skip).unwrap_err().to_string()
        };
        let cases = [
            (
                err(Level::F8E4m3, Method::Rtn, Some(64), None, vec![]),
                "group size 64 is not supported for float",
            ),
            (
                err(Level::Int4, Method::Rtn, Some(0), None, vec![]),
                "group size 0 is invalid",
            ),
            (
                err(Level::F16, Method::Hqq, None, None, vec![]),
                "hqq applies to integer levels only",
            ),
            (
                err(Level::Int4, Method::Hqq, None, Some(true), vec![]),
                "hqq optimises a zero point",
            ),
            (
                err(Level::Int8Dyn, Method::Hqq, None, None, vec![]),
                "hqq weights are affine",
            ),
            (
                err(Level::Int8Dyn, Method::Rtn, None, Some(false), vec![]),
                "would run weight-only",
            ),
            (
                err(Level::Int8Dyn, Method::Rtn, Some(64), None, vec![]),
                "group size 64 gives several scales",
            ),
            (
                err(Level::F8E5m2, Method::Rtn, None, Some(false), vec![]),
                "no zero point",
            ),
            (
                err(Level::Int8, Method::Rtn, None, None, vec!["a[".into()]),
                "skip pattern 'a[' is not a valid glob",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "'{message}' lacks '{expected}'");
            assert!(!message.contains('\n'), "multi-line: {message}");
        }
    }

    #[test]
    fn group_sizes_fall_back_to_per_channel_on_short_rows() {
        let int4 = Recipe::level_default(Level::Int4);
        assert_eq!(int4.effective_group_size(1024), 64);
        assert_eq!(int4.effective_group_size(147), 64, "trailing partial group of 19");
        assert_eq!(int4.effective_group_size(9), 9, "depthwise rows are per channel");
        assert_eq!(int4.effective_group_size(64), 64);
        assert_eq!(Recipe::level_default(Level::Int2).effective_group_size(1024), 32);
        assert_eq!(Recipe::level_default(Level::Int8).effective_group_size(1024), 1024);
        assert!(Recipe::level_default(Level::Int8).is_symmetric());
        assert!(
            !Recipe::new(Level::Int8, Method::Hqq, None, None, vec![])
                .unwrap()
                .is_symmetric()
        );
        assert!(!int4.is_symmetric());
    }

    #[test]
    fn skip_globs_match_weight_names() {
        let recipe = Recipe::new(
            Level::Int4,
            Method::Hqq,
            None,
            None,
            vec!["decode_head.classifier*".into(), "*.dwconv.*".into()],
        )
        .unwrap();
        assert!(recipe.skips("decode_head.classifier.weight"));
        assert!(recipe.skips("segformer.encoder.block.0.0.mlp.dwconv.dwconv.weight"));
        assert!(!recipe.skips("decode_head.linear_fuse.weight"));
    }

    #[test]
    fn recipes_round_trip_through_json() {
        let recipe = Recipe::new(Level::Int8Dyn, Method::Rtn, None, Some(true), vec!["x*".into()]).unwrap();
        let json = serde_json::to_string(&recipe).unwrap();
        assert!(json.contains("\"int8-dyn\"") && json.contains("\"rtn\""), "{json}");
        let back: Recipe = serde_json::from_str(&json).unwrap();
        assert_eq!(back, recipe);
        let f8: Level = serde_json::from_str("\"f8\"").unwrap();
        assert_eq!(f8, Level::F8E4m3);
    }
}
