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
    /// W8A8 with static activations: symmetric per-channel int8 weights, and the input of every Linear and dense
    /// convolution quantized to int8 with one per-tensor scale fixed by calibration (the int8 GEMM, no absmax pass).
    #[serde(rename = "int8-static")]
    Int8Static,
    /// Simulated: float8 e4m3 weights per channel (as `f8`), activations quantized and dequantized to e4m3 with a
    /// calibrated per-tensor scale before the float GEMM (no kernel: the accuracy is real, the speed is not).
    #[serde(rename = "w8a8-f8")]
    W8A8F8,
    /// 4-bit integer weights, two per byte.
    #[serde(rename = "int4")]
    Int4,
    /// W4A8 on the int8 GEMM: symmetric per-channel int4 weights (codes in [-7, 7], one scale per output channel,
    /// stored two per byte) unpacked to int8 once when the plan packs them, and activations quantized to int8 per
    /// row at run time, as `int8-dyn`.
    #[serde(rename = "int4-dyn")]
    Int4Dyn,
    /// Simulated: int4 weights (groups of 64, as `int4`), activations quantized and dequantized to int8 with a
    /// calibrated per-tensor scale before the float GEMM.
    #[serde(rename = "w4a8")]
    W4A8,
    /// 2-bit integer weights, four per byte.
    #[serde(rename = "int2")]
    Int2,
}

impl Level {
    /// Every level, in the order reports list them.
    pub const ALL: [Level; 13] = [
        Level::F32,
        Level::F16,
        Level::Bf16,
        Level::F8E4m3,
        Level::F8E5m2,
        Level::Int8,
        Level::Int8Dyn,
        Level::Int8Static,
        Level::W8A8F8,
        Level::Int4,
        Level::Int4Dyn,
        Level::W4A8,
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
            "int8-static" | "int8static" | "int8_static" => Level::Int8Static,
            "w8a8-f8" | "w8a8f8" | "w8a8_f8" | "w8a8-fp8" => Level::W8A8F8,
            "w4a8" | "w4a8-int8" => Level::W4A8,
            "int4" | "i4" | "qint4" => Level::Int4,
            "int4-dyn" | "int4dyn" | "int4_dyn" => Level::Int4Dyn,
            "int2" | "i2" | "qint2" => Level::Int2,
            other => {
                return Err(Error::unsupported(
                    format!("quantization level '{other}'"),
                    format!(
                        "unknown quantization level '{other}': expected one of f32, f16, bf16, f8 (float8, fp8, \
                         f8e4m3), f8e5m2, int8, int8-dyn, int8-static, w8a8-f8, int4, int4-dyn, w4a8, int2"
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
            Level::Int8Static => "int8-static",
            Level::W8A8F8 => "w8a8-f8",
            Level::W4A8 => "w4a8",
            Level::Int4 => "int4",
            Level::Int4Dyn => "int4-dyn",
            Level::Int2 => "int2",
        }
    }

    /// True for `f32`, the unquantized baseline.
    pub fn is_float_baseline(self) -> bool {
        self == Level::F32
    }

    /// True when activations are quantized at run time too (`int8-dyn`, `int4-dyn`).
    pub fn dynamic_activations(self) -> bool {
        matches!(self, Level::Int8Dyn | Level::Int4Dyn)
    }

    /// The format of a static level's activations, quantized with per-tensor scales fixed by calibration
    /// (`int8-static`, `w4a8`: int8; `w8a8-f8`: e4m3); `None` for every other level.
    pub fn static_activations(self) -> Option<super::act::ActFormat> {
        match self {
            Level::Int8Static | Level::W4A8 => Some(super::act::ActFormat::Int8),
            Level::W8A8F8 => Some(super::act::ActFormat::F8E4m3),
            _ => None,
        }
    }

    /// True for the levels that need calibration data before they can run: the static activation scales come from
    /// histograms of every Linear and dense convolution input ([`Level::stats_needs`]).
    pub fn needs_calibration(self) -> bool {
        self.static_activations().is_some()
    }

    /// The layer-input statistics the level reads (histograms for the static levels; nothing otherwise). A
    /// calibrated method's own needs come from [`Method::stats_needs`]; the capture takes their union.
    pub fn stats_needs(self) -> super::stats::StatsNeeds {
        super::stats::StatsNeeds {
            hessian: false,
            histogram: self.needs_calibration(),
        }
    }

    /// True for the levels whose activation quantization is simulated (quantized then dequantized before a float
    /// GEMM, `w8a8-f8` and `w4a8`): their accuracy is what the format gives, their speed is not a kernel's.
    pub fn simulated_activations(self) -> bool {
        matches!(self, Level::W8A8F8 | Level::W4A8)
    }

    /// True for the levels that run Linear layers and dense convolutions through the int8 GEMM, which needs
    /// symmetric integer weights with one scale per output channel (`int8-dyn`, `int8-static`, and `int4-dyn`,
    /// whose int4 codes are unpacked to int8 when the weight is packed).
    pub fn int8_gemm(self) -> bool {
        matches!(self, Level::Int8Dyn | Level::Int8Static | Level::Int4Dyn)
    }

    /// True when the level quantizes activations in any way (run time, static or simulated).
    pub fn quantizes_activations(self) -> bool {
        self.dynamic_activations() || self.static_activations().is_some()
    }

    /// Bits of an integer level's codes; `None` for float levels.
    pub fn int_bits(self) -> Option<u32> {
        match self {
            Level::Int8 | Level::Int8Dyn | Level::Int8Static => Some(8),
            Level::Int4 | Level::Int4Dyn | Level::W4A8 => Some(4),
            Level::Int2 => Some(2),
            _ => None,
        }
    }

    /// Group size used when the recipe names none: 64 for int4 (and w4a8), 32 for int2, per channel otherwise
    /// (`int4-dyn` included: the int8 GEMM has one scale per output channel).
    pub fn default_group_size(self) -> Option<usize> {
        match self {
            Level::Int4 | Level::W4A8 => Some(64),
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
    /// GPTQ (Frantar et al. 2022): columns rounded one by one, each one's error spread over the columns not yet
    /// rounded through the inverse Hessian of the layer's calibration inputs.
    Gptq,
    /// AWQ (Lin et al. 2023): per-input-channel scales from calibration activation magnitudes, searched per layer to
    /// minimise the layer's output error, then round to nearest; the inverse scale folds into dequantization.
    Awq,
    /// AWQ's scales with GPTQ's rounding.
    #[serde(rename = "awq+gptq")]
    AwqGptq,
}

impl Method {
    /// Every method, in the order reports list them.
    pub const ALL: [Method; 5] = [Method::Rtn, Method::Hqq, Method::Gptq, Method::Awq, Method::AwqGptq];

    /// Parses a method as users write it (`rtn`, `hqq`, `gptq`, `awq`, `awq+gptq`).
    pub fn parse(text: &str) -> Result<Method> {
        match text.trim().to_ascii_lowercase().as_str() {
            "rtn" | "minmax" | "round" => Ok(Method::Rtn),
            "hqq" => Ok(Method::Hqq),
            "gptq" => Ok(Method::Gptq),
            "awq" => Ok(Method::Awq),
            "awq+gptq" | "awq-gptq" | "gptq+awq" => Ok(Method::AwqGptq),
            other => Err(Error::unsupported(
                format!("quantization method '{other}'"),
                format!("unknown quantization method '{other}': expected rtn, hqq, gptq, awq or awq+gptq"),
            )),
        }
    }

    /// The canonical short name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Hqq => "hqq",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq+gptq",
        }
    }

    /// True for the methods that read calibration statistics of the layer inputs.
    pub fn needs_calibration(self) -> bool {
        self.stats_needs().hessian
    }

    /// The statistics this method reads (both GPTQ and AWQ's output-error search use `X^T X`).
    pub fn stats_needs(self) -> super::stats::StatsNeeds {
        super::stats::StatsNeeds {
            hessian: matches!(self, Method::Gptq | Method::Awq | Method::AwqGptq),
            histogram: false,
        }
    }

    /// True for the methods whose weights carry per-input-column scales (AWQ's folded inverse scale).
    pub fn scales_columns(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
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
    /// Per-layer rules added to every quantized recipe (`[[quant.rules]]`).
    pub rules: &'a [LayerRule],
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
                let recipe = Recipe::new(level, method, self.group_size, self.symmetric, self.skip.to_vec())
                    .and_then(|r| r.with_rules(self.rules.iter().cloned()));
                match recipe {
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
    /// Glob patterns over weight names that stay float (e.g. `decode_head.classifier*`); the same as rules with
    /// level f32 placed before all others.
    pub skip: Vec<String>,
    /// Per-layer rules (mixed precision): the first rule whose pattern matches a weight decides its level, method
    /// and group size; weights no rule matches use the fields above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<LayerRule>,
    /// A name for a mixed recipe, used in its label instead of the hash of its rules (`mixed-3.4b-<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Whether `pattern` names `layer`: its module path as `segq inspect` lists it (`decode_head.linear_fuse`), or that
/// path with `.weight`, as a checkpoint names the tensor.
fn matches_layer(pattern: &glob::Pattern, layer: &str) -> bool {
    pattern.matches(layer) || pattern.matches(&format!("{layer}.weight"))
}

/// One rule of a mixed recipe (`[[quant.rules]]` in segq.toml, `[[rules]]` in a `--recipe` file).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRule {
    /// Glob over layer names (module paths as `segq inspect` lists them, e.g. `decode_head.*` or
    /// `segformer.encoder.block.0.*.attention.*`); the tensor name (`....weight`) matches too.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The level of the matching weights; `f32` keeps them float.
    pub level: Level,
    /// Default: the recipe's method when it applies to this level, else rtn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Default: this level's default group size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    /// Default: this level's and method's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric: Option<bool>,
}

impl LayerRule {
    /// A rule giving the weights `pattern` matches `level` with its defaults.
    pub fn new(pattern: impl Into<String>, level: Level) -> LayerRule {
        LayerRule {
            pattern: pattern.into(),
            level,
            method: None,
            group_size: None,
            symmetric: None,
        }
    }

    fn matches(&self, layer: &str) -> bool {
        glob::Pattern::new(&self.pattern).is_ok_and(|p| matches_layer(&p, layer))
    }
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
            rules: Vec::new(),
            name: None,
        };
        recipe.validate()?;
        Ok(recipe)
    }

    /// This recipe with per-layer `rules` added after its own (validated: every rule's pattern and combination).
    pub fn with_rules(mut self, rules: impl IntoIterator<Item = LayerRule>) -> Result<Recipe> {
        self.rules.extend(rules);
        self.validate()?;
        Ok(self)
    }

    /// The plain recipe of a level: its default method (rtn), group size and symmetry, nothing skipped.
    pub fn level_default(level: Level) -> Recipe {
        Recipe {
            level,
            method: Method::Rtn,
            group_size: None,
            symmetric: None,
            skip: Vec::new(),
            rules: Vec::new(),
            name: None,
        }
    }

    /// True for the float model itself: level f32 with no rule quantizing any weight.
    pub fn is_float_baseline(&self) -> bool {
        self.level.is_float_baseline() && !self.is_mixed() && self.name.is_none()
    }

    /// True when rows and checkpoints of this recipe carry the whole recipe: mixed or named ones (a search can
    /// choose one level for every layer, and its row is still the search's).
    pub fn is_custom(&self) -> bool {
        self.is_mixed() || self.name.is_some()
    }

    /// True when rules give some weights another quantized level or method than the recipe's own (rules that only
    /// keep weights float are skips and leave the recipe uniform).
    pub fn is_mixed(&self) -> bool {
        self.rules.iter().any(|r| r.level != Level::F32)
    }

    /// The uniform recipe the weight of `layer` (its module path, e.g. `decode_head.linear_fuse`) is quantized with,
    /// `None` when it stays float: skip patterns first, then the first matching rule, then the recipe's own level.
    /// Patterns match the module path or the tensor name (`decode_head.linear_fuse.weight`).
    pub fn for_weight(&self, layer: &str) -> Option<Recipe> {
        if self.skips(layer) {
            return None;
        }
        let uniform = match self.rules.iter().find(|r| r.matches(layer)) {
            Some(rule) => self.rule_recipe(rule),
            None => self.own_level(),
        };
        (!uniform.level.is_float_baseline()).then_some(uniform)
    }

    /// The uniform recipes a mixed recipe can give weights (its own level unless f32, then each quantizing
    /// rule's), for checks that apply per format; `[self]` for a uniform recipe.
    pub fn uniform_parts(&self) -> Vec<Recipe> {
        if !self.is_mixed() {
            return vec![self.clone()];
        }
        let base = self.own_level();
        let rules = self
            .rules
            .iter()
            .filter(|r| r.level != Level::F32)
            .map(|r| self.rule_recipe(r));
        (!self.level.is_float_baseline())
            .then_some(base)
            .into_iter()
            .chain(rules)
            .collect()
    }

    /// The uniform recipe of the weights no rule matches: this recipe without its skips, rules and name.
    fn own_level(&self) -> Recipe {
        Recipe {
            rules: Vec::new(),
            skip: Vec::new(),
            name: None,
            ..self.clone()
        }
    }

    /// The uniform recipe of a rule: unset fields take the level's defaults, and the recipe's method where it
    /// applies to the rule's level (hqq does not apply to float levels).
    fn rule_recipe(&self, rule: &LayerRule) -> Recipe {
        let method = rule.method.unwrap_or(if rule.level.int_bits().is_some() {
            self.method
        } else {
            Method::Rtn
        });
        Recipe {
            level: rule.level,
            method,
            group_size: rule.group_size,
            symmetric: rule.symmetric,
            skip: Vec::new(),
            rules: Vec::new(),
            name: None,
        }
    }

    /// What names a mixed recipe in labels: its name, else the first 8 hex digits of the SHA-256 of its JSON (so
    /// the same rules always get the same label).
    pub fn tag(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        use sha2::Digest;
        let json = serde_json::to_string(self).unwrap_or_default();
        let digest = sha2::Sha256::digest(json.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The label of rows and checkpoints: [`Recipe::label`] for uniform recipes, `mixed-3.4b-<tag>` for mixed
    /// ones (their bits per weight depend on the model, so they are passed in).
    pub fn label_with_bits(&self, bits_per_weight: f64) -> String {
        if self.is_mixed() {
            format!("mixed-{bits_per_weight:.1}b-{}", self.tag())
        } else {
            self.label()
        }
    }

    /// Checks the combination of level, method, group size, symmetry, skip patterns and rules.
    pub fn validate(&self) -> Result<()> {
        self.validate_uniform()?;
        self.validate_patterns()
    }

    /// Checks the combination of level, method, group size and symmetry.
    fn validate_uniform(&self) -> Result<()> {
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
                if level.int8_gemm() {
                    let bits = level.int_bits().unwrap_or(8);
                    let why = if self.method == Method::Hqq {
                        Some("hqq weights are affine (they have a zero point)".to_string())
                    } else if self.method.scales_columns() {
                        Some(format!(
                            "{} weights carry a scale per input column, which the int8 GEMM cannot apply",
                            self.method
                        ))
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
                                "{level} multiplies int8 activations by symmetric int{bits} weights with one scale \
                                 per output channel; {why}, so it would run weight-only: use {level} with rtn or \
                                 gptq and no group size, or int{bits} with {}",
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
        Ok(())
    }

    /// Checks skip patterns, rules and the name.
    fn validate_patterns(&self) -> Result<()> {
        for pattern in &self.skip {
            glob::Pattern::new(pattern)
                .map_err(|e| Error::config("skip", format!("skip pattern '{pattern}' is not a valid glob: {e}")))?;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let what = format!("rule {} (match = \"{}\")", i + 1, rule.pattern);
            glob::Pattern::new(&rule.pattern)
                .map_err(|e| Error::config(what.clone(), format!("{what}: not a valid glob: {e}")))?;
            // Activations are quantized model-wide (int8 attention, the composed head, calibrated scales): a layer
            // cannot opt in, nor switch to another activation scheme.
            let activations = |l: Level| (l.dynamic_activations(), l.static_activations());
            if rule.level.quantizes_activations() && activations(rule.level) != activations(self.level) {
                let level = rule.level;
                return Err(Error::unsupported(
                    what.clone(),
                    format!(
                        "{what}: {level} quantizes activations for the whole model; make {level} the recipe's \
                         level and give the other layers rules"
                    ),
                ));
            }
            self.rule_recipe(rule)
                .validate_uniform()
                .map_err(|e| Error::config(what.clone(), format!("{what}: {e}")))?;
        }
        if let Some(name) = &self.name
            && (name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(Error::config(
                "recipe name",
                format!("recipe name '{name}': use letters, digits, '-', '_' or '.' (it becomes part of labels)"),
            ));
        }
        Ok(())
    }

    /// Whether weights are stored without zero point: int8 with rtn is symmetric by default (absmax per channel),
    /// and so is every level on the int8 GEMM (`int4-dyn` included); int4/int2 and every hqq recipe are affine;
    /// float levels are always symmetric (scale only).
    pub fn is_symmetric(&self) -> bool {
        match self.level.int_bits() {
            None => true,
            Some(bits) if bits == 8 || self.level.int8_gemm() => self
                .symmetric
                .unwrap_or(matches!(self.method, Method::Rtn | Method::Gptq)),
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

    /// A short stable name such as `f32`, `f8`, `int8-rtn`, `int8-dyn-rtn`, `int4-hqq-g64`, `int4-rtn-g64-sym`;
    /// `mixed-<tag>` for a mixed recipe (rows and checkpoints use [`Recipe::label_with_bits`]); a named uniform
    /// recipe adds its name (`int8-rtn-auto-drop0.5`).
    pub fn label(&self) -> String {
        if self.is_mixed() {
            return format!("mixed-{}", self.tag());
        }
        match &self.name {
            Some(name) => format!("{}-{name}", self.uniform_label()),
            None => self.uniform_label(),
        }
    }

    fn uniform_label(&self) -> String {
        let level = self.level;
        let Some(bits) = level.int_bits() else {
            return level.name().to_string();
        };
        let mut label = format!("{}-{}", level.name(), self.method.name());
        if let Some(g) = self.requested_group_size() {
            label.push_str(&format!("-g{g}"));
        }
        let default_symmetric = (bits == 8 || level.int8_gemm()) && matches!(self.method, Method::Rtn | Method::Gptq);
        match (self.is_symmetric(), default_symmetric) {
            (true, false) => label.push_str("-sym"),
            (false, true) => label.push_str("-asym"),
            _ => {}
        }
        label
    }

    /// True when the layer (module path, with or without `.weight`) matches a skip pattern and must stay float.
    pub fn skips(&self, layer: &str) -> bool {
        self.skip
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .any(|p| matches_layer(&p, layer))
    }
}

/// A `--recipe FILE.toml`: a level with optional method, group size, symmetry, skips and `[[rules]]`, e.g.
///
/// ```toml
/// name = "head8"
/// level = "int4"
/// method = "hqq"
/// [[rules]]
/// match = "decode_head.*"
/// level = "int8"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: Option<String>,
    level: Level,
    method: Option<Method>,
    group_size: Option<usize>,
    symmetric: Option<bool>,
    #[serde(default)]
    skip: Vec<String>,
    #[serde(default)]
    rules: Vec<LayerRule>,
}

impl Recipe {
    /// Parses a recipe file's text; `origin` (the file) and the line go into errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Recipe> {
        let file: RecipeFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| crate::error::line_of(text, s.start));
            Error::config(format!("{origin} line {line}"), e.message().trim())
        })?;
        let recipe = Recipe {
            level: file.level,
            method: file.method.unwrap_or(Method::Rtn),
            group_size: file.group_size,
            symmetric: file.symmetric,
            skip: file.skip,
            rules: file.rules,
            name: file.name,
        };
        recipe.validate().map_err(|e| e.within(origin))?;
        Ok(recipe)
    }

    /// Reads a `--recipe` file.
    pub fn read_file(path: &std::path::Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Recipe::from_toml(&text, &path.display().to_string())
    }

    /// The recipe as a `--recipe` file (what [`Recipe::from_toml`] reads back to an equal recipe).
    pub fn to_toml(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = String::new();
        if let Some(name) = &self.name {
            out.push_str(&format!("name = {}\n", quote(name)));
        }
        out.push_str(&format!(
            "level = {}\nmethod = {}\n",
            quote(self.level.name()),
            quote(self.method.name())
        ));
        if let Some(g) = self.group_size {
            out.push_str(&format!("group_size = {g}\n"));
        }
        if let Some(sym) = self.symmetric {
            out.push_str(&format!("symmetric = {sym}\n"));
        }
        if !self.skip.is_empty() {
            let skip: Vec<String> = self.skip.iter().map(|p| quote(p)).collect();
            out.push_str(&format!("skip = [{}]\n", skip.join(", ")));
        }
        for rule in &self.rules {
            out.push_str(&format!(
                "\n[[rules]]\nmatch = {}\nlevel = {}\n",
                quote(&rule.pattern),
                quote(rule.level.name())
            ));
            if let Some(m) = rule.method {
                out.push_str(&format!("method = {}\n", quote(m.name())));
            }
            if let Some(g) = rule.group_size {
                out.push_str(&format!("group_size = {g}\n"));
            }
            if let Some(sym) = rule.symmetric {
                out.push_str(&format!("symmetric = {sym}\n"));
            }
        }
        out
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
        assert_eq!(Method::parse("gptq").unwrap(), Method::Gptq);
        assert!(Method::parse("gptq2").unwrap_err().to_string().contains("'gptq2'"));
    }

    #[test]
    fn static_levels_need_calibration_and_refuse_what_their_kernels_cannot_run() {
        use crate::quant::act::ActFormat;
        assert_eq!(Level::parse("int8_static").unwrap(), Level::Int8Static);
        assert_eq!(Level::parse("W8A8-FP8").unwrap(), Level::W8A8F8);
        for (level, format, simulated) in [
            (Level::Int8Static, ActFormat::Int8, false),
            (Level::W8A8F8, ActFormat::F8E4m3, true),
            (Level::W4A8, ActFormat::Int8, true),
        ] {
            assert_eq!(level.static_activations(), Some(format));
            assert!(level.needs_calibration() && level.quantizes_activations());
            assert_eq!(level.simulated_activations(), simulated);
            let needs = level.stats_needs();
            assert!(needs.histogram && !needs.hessian);
        }
        for level in [Level::F32, Level::Int8, Level::Int8Dyn, Level::Int4] {
            assert!(!level.needs_calibration() && level.stats_needs() == Default::default());
        }
        assert_eq!(
            crate::quant::Format::of_level(Level::W8A8F8),
            crate::quant::Format::F8E4m3
        );
        assert_eq!(crate::quant::Format::of_level(Level::W4A8), crate::quant::Format::Int4);
        let label = |level, method| Recipe::new(level, method, None, None, vec![]).unwrap().label();
        assert_eq!(label(Level::Int8Static, Method::Rtn), "int8-static-rtn");
        assert_eq!(label(Level::W4A8, Method::Hqq), "w4a8-hqq-g64");
        assert_eq!(label(Level::W8A8F8, Method::Rtn), "w8a8-f8");
        // int8-static runs the int8 GEMM: symmetric per-channel weights only, as int8-dyn.
        for (method, g, sym, why) in [
            (Method::Hqq, None, None, "hqq weights are affine"),
            (Method::Awq, None, None, "scale per input column"),
            (Method::Rtn, Some(64), None, "group size 64"),
            (Method::Rtn, None, Some(false), "affine weights"),
        ] {
            let e = Recipe::new(Level::Int8Static, method, g, sym, vec![])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("int8-static multiplies int8 activations") && e.contains(why),
                "{e}"
            );
        }
        assert!(Recipe::new(Level::W8A8F8, Method::Hqq, None, None, vec![]).is_err());
        // Activations are quantized model-wide: no rule switches a layer to another activation scheme.
        let mixed = |level, rule| Recipe::level_default(level).with_rules([LayerRule::new("decode_head.*", rule)]);
        assert!(mixed(Level::Int8Static, Level::Int4).is_ok());
        for (level, rule) in [(Level::Int8, Level::Int8Static), (Level::Int8Static, Level::Int8Dyn)] {
            let e = mixed(level, rule).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{rule} quantizes activations for the whole model")),
                "{e}"
            );
        }
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
        assert_eq!(label(Level::Int4Dyn, Method::Rtn, None, None), "int4-dyn-rtn");
        assert_eq!(label(Level::Int4Dyn, Method::Gptq, None, Some(true)), "int4-dyn-gptq");
    }

    #[test]
    fn int4_dyn_runs_symmetric_per_channel_int4_on_the_int8_gemm() {
        for alias in ["int4-dyn", "INT4_DYN", "int4dyn"] {
            assert_eq!(Level::parse(alias).unwrap(), Level::Int4Dyn);
        }
        let level = Level::Int4Dyn;
        assert!(Level::ALL.contains(&level) && level.name() == "int4-dyn");
        assert!(level.dynamic_activations() && level.int8_gemm() && !level.needs_calibration());
        assert_eq!((level.int_bits(), level.default_group_size()), (Some(4), None));
        assert_eq!(crate::quant::Format::of_level(level), crate::quant::Format::Int4);
        let rtn = Recipe::level_default(level);
        assert!(rtn.is_symmetric());
        assert_eq!(rtn.effective_group_size(256), 256, "one scale per output channel");
        assert!(
            Recipe::new(level, Method::Gptq, None, None, vec![])
                .unwrap()
                .is_symmetric()
        );
        for (method, g, sym, why) in [
            (
                Method::Rtn,
                Some(64),
                None,
                "group size 64 gives several scales per output channel",
            ),
            (Method::Hqq, None, None, "hqq weights are affine"),
            (Method::Awq, None, None, "scale per input column"),
            (Method::AwqGptq, None, None, "scale per input column"),
            (Method::Rtn, None, Some(false), "affine weights"),
        ] {
            let e = Recipe::new(level, method, g, sym, vec![]).unwrap_err().to_string();
            assert!(
                e.contains("int4-dyn multiplies int8 activations by symmetric int4 weights")
                    && e.contains(why)
                    && e.contains("or int4 with")
                    && !e.contains('\n'),
                "{e}"
            );
        }
        // int8-dyn and int4-dyn quantize activations the same way: mixing them per layer is allowed.
        let mixed = Recipe::level_default(Level::Int8Dyn).with_rules([LayerRule::new("decode_head.*", level)]);
        assert!(mixed.is_ok());
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
    fn rules_pick_each_weights_recipe_first_match_wins() {
        let head = "decode_head.linear_fuse.weight";
        let query = "segformer.encoder.block.0.0.attention.self.query.weight";
        let mut head8 = LayerRule::new("decode_head.*", Level::Int8);
        head8.method = Some(Method::Rtn);
        let recipe = Recipe::new(Level::Int4, Method::Hqq, None, None, vec!["*.classifier.*".into()])
            .unwrap()
            .with_rules([
                head8,
                LayerRule::new("decode_head.*", Level::Int2),
                LayerRule::new("*.query.*", Level::F32),
            ])
            .unwrap();
        assert!(recipe.is_mixed() && !recipe.is_float_baseline());
        assert_eq!(
            recipe.for_weight(head).unwrap().label(),
            "int8-rtn",
            "the first matching rule wins"
        );
        assert_eq!(recipe.for_weight(query), None, "an f32 rule keeps the weight float");
        assert_eq!(
            recipe.for_weight("decode_head.classifier.weight"),
            None,
            "skips come before rules"
        );
        let other = recipe
            .for_weight("segformer.encoder.block.0.0.mlp.dense1.weight")
            .unwrap();
        assert_eq!(
            other.label(),
            "int4-hqq-g64",
            "unmatched weights use the recipe's own level"
        );
        assert!(other.rules.is_empty() && other.skip.is_empty());
        // A rule's level takes the recipe's method where it applies, else rtn.
        let f8 = Recipe::new(Level::Int4, Method::Hqq, None, None, vec![])
            .unwrap()
            .with_rules([LayerRule::new("a*", Level::F8E4m3), LayerRule::new("b*", Level::Int2)])
            .unwrap();
        assert_eq!(f8.for_weight("a.weight").unwrap().method, Method::Rtn);
        assert_eq!(f8.for_weight("b.weight").unwrap().label(), "int2-hqq-g32");
        // One layer quantized on a float model: mixed, not the baseline.
        let one = Recipe::level_default(Level::F32)
            .with_rules([LayerRule::new(query, Level::Int4)])
            .unwrap();
        assert!(one.is_mixed() && !one.is_float_baseline());
        assert_eq!(one.for_weight(head), None);
        assert_eq!(one.for_weight(query).unwrap().level, Level::Int4);
        // Rules that only keep weights float are skips: the recipe stays uniform and keeps its label.
        let skip_like = Recipe::level_default(Level::Int8)
            .with_rules([LayerRule::new("x*", Level::F32)])
            .unwrap();
        assert!(!skip_like.is_mixed());
        assert_eq!(skip_like.label_with_bits(7.9), "int8-rtn");
    }

    #[test]
    fn bad_rules_are_one_line_errors_naming_the_rule() {
        let check = |rule: LayerRule, base: Level, expected: &str| {
            let e = Recipe::level_default(base).with_rules([rule]).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("rule 1") && !e.contains('\n'), "{e}");
        };
        check(LayerRule::new("a[", Level::Int4), Level::Int8, "not a valid glob");
        check(
            LayerRule::new("a*", Level::Int8Dyn),
            Level::Int4,
            "int8-dyn quantizes activations",
        );
        let mut hqq_f16 = LayerRule::new("a*", Level::F16);
        hqq_f16.method = Some(Method::Hqq);
        check(hqq_f16, Level::Int4, "hqq applies to integer levels only");
        let mut g0 = LayerRule::new("a*", Level::Int4);
        g0.group_size = Some(0);
        check(g0, Level::Int4, "group size 0");
        let named = Recipe {
            name: Some("has space".into()),
            ..Recipe::level_default(Level::Int4)
        };
        assert!(
            named
                .validate()
                .unwrap_err()
                .to_string()
                .contains("recipe name 'has space'")
        );
    }

    #[test]
    fn mixed_labels_carry_bits_and_a_stable_tag() {
        let recipe = Recipe::level_default(Level::Int4)
            .with_rules([LayerRule::new("decode_head.*", Level::Int8)])
            .unwrap();
        let label = recipe.label_with_bits(4.4321);
        assert!(
            label.starts_with("mixed-4.4b-") && label.len() == "mixed-4.4b-".len() + 8,
            "{label}"
        );
        assert_eq!(recipe.clone().label_with_bits(4.4321), label, "same rules, same label");
        let other = Recipe::level_default(Level::Int4)
            .with_rules([LayerRule::new("decode_head.*", Level::Int2)])
            .unwrap();
        assert_ne!(other.label_with_bits(4.4321), label);
        let named = Recipe {
            name: Some("head8".into()),
            ..recipe
        };
        assert_eq!(named.label_with_bits(4.4321), "mixed-4.4b-head8");
        // A search may choose one level everywhere: its named recipe is still its own row, never the baseline.
        let uniform = Recipe {
            name: Some("auto-drop0".into()),
            ..Recipe::level_default(Level::F32)
        };
        assert!(!uniform.is_float_baseline() && uniform.is_custom() && !uniform.is_mixed());
        assert_eq!(uniform.label_with_bits(32.0), "f32-auto-drop0");
    }

    #[test]
    fn recipe_files_round_trip_and_name_their_errors() {
        let text = "name = \"head8\"\nlevel = \"int4\"\nmethod = \"hqq\"\nskip = [\"*.classifier.*\"]\n\n\
                    [[rules]]\nmatch = \"decode_head.*\"\nlevel = \"int8\"\n\n[[rules]]\nmatch = \"*.query.*\"\n\
                    level = \"int2\"\ngroup_size = 16\nmethod = \"rtn\"\nsymmetric = true\n";
        let recipe = Recipe::from_toml(text, "r.toml").unwrap();
        assert_eq!(recipe.name.as_deref(), Some("head8"));
        assert_eq!(recipe.rules.len(), 2);
        assert_eq!(recipe.rules[1].group_size, Some(16));
        assert_eq!(Recipe::from_toml(&recipe.to_toml(), "again.toml").unwrap(), recipe);
        let minimal = Recipe::from_toml("level = \"int8\"\n", "m.toml").unwrap();
        assert_eq!(minimal, Recipe::level_default(Level::Int8));
        let e = Recipe::from_toml("level = \"int8\"\nrules = 3\n", "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.toml line 2"), "{e}");
        let e = Recipe::from_toml(
            "level = \"int4\"\n[[rules]]\nmatch = \"x\"\nlevel = \"int4\"\nbits = 3\n",
            "u.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("u.toml") && e.contains("bits"), "{e}");
        let e = Recipe::from_toml(
            "level = \"int4\"\n[[rules]]\nmatch = \"a[\"\nlevel = \"int8\"\n",
            "g.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("g.toml") && e.contains("not a valid glob"), "{e}");
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
