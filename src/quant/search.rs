//! Mixed-precision search: given, for every layer, what each candidate level costs in stored bits and how much
//! damage quantizing that layer alone to it does, pick one level per layer that minimises the summed damage under
//! a bits-per-weight budget, or that uses the fewest bits with the summed damage under a limit.
//!
//! Both are the multiple-choice knapsack problem, solved by dynamic programming over the cost in units of at most
//! 1/200,000 of the budget (every cost rounded *up* to a unit, so the true total never exceeds the budget; at most
//! one unit per layer can be left unused: for B0 at 3.5 bits, under 0.001 bits per weight). A table rather than
//! greedy: greedy by damage-per-bit can miss the best combination when a layer's options are not convex, and with
//! ~100 layers and a few levels the table takes milliseconds. Ties go to the cheaper option, then to the earlier
//! one, so the result is deterministic.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What the search optimises, parsed from `auto:bits=3.5` or `auto:max-drop=0.5`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum AutoTarget {
    /// The least damage with average stored bits per weight (over all Linear/Conv weights) at most this.
    Bits(f64),
    /// The fewest bits with the predicted agreement-mIoU drop against the reference at most this many points.
    MaxDrop(f64),
}

impl AutoTarget {
    /// Parses `auto:bits=3.5` or `auto:max-drop=0.5` (the `auto:` prefix optional).
    pub fn parse(text: &str) -> Result<AutoTarget> {
        let spec = text.trim();
        let body = spec.strip_prefix("auto:").unwrap_or(spec);
        let bad = |why: &str| {
            Error::config(
                format!("level '{spec}'"),
                format!("level '{spec}': {why} (expected auto:bits=B with 1 < B < 32, or auto:max-drop=P points)"),
            )
        };
        let (key, value) = body.split_once('=').ok_or_else(|| bad("no '='"))?;
        let value: f64 = value.trim().parse().map_err(|_| bad("not a number"))?;
        match key.trim() {
            "bits" if value > 1.0 && value < 32.0 => Ok(AutoTarget::Bits(value)),
            "bits" => Err(bad("bits out of range")),
            "max-drop" | "max_drop" | "drop" if value >= 0.0 && value.is_finite() => Ok(AutoTarget::MaxDrop(value)),
            "max-drop" | "max_drop" | "drop" => Err(bad("the drop must be a non-negative number of points")),
            _ => Err(bad("unknown target")),
        }
    }

    /// `auto:bits=3.5`, as users write it.
    pub fn spec(self) -> String {
        match self {
            AutoTarget::Bits(b) => format!("auto:bits={b}"),
            AutoTarget::MaxDrop(d) => format!("auto:max-drop={d}"),
        }
    }

    /// A short name for labels and files: `auto-bits3.5`, `auto-drop0.5`.
    pub fn name(self) -> String {
        match self {
            AutoTarget::Bits(b) => format!("auto-bits{b}"),
            AutoTarget::MaxDrop(d) => format!("auto-drop{d}"),
        }
    }
}

impl std::fmt::Display for AutoTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec())
    }
}

impl From<AutoTarget> for String {
    fn from(target: AutoTarget) -> String {
        target.spec()
    }
}

impl TryFrom<String> for AutoTarget {
    type Error = Error;
    fn try_from(text: String) -> Result<AutoTarget> {
        AutoTarget::parse(&text)
    }
}

impl std::str::FromStr for AutoTarget {
    type Err = Error;
    fn from_str(text: &str) -> Result<AutoTarget> {
        AutoTarget::parse(text)
    }
}

/// An entry of `--quant`: a level, or a mixed-precision search target (`auto:bits=3.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LevelSpec {
    Level(crate::quant::Level),
    Auto(AutoTarget),
}

impl LevelSpec {
    pub fn parse(text: &str) -> Result<LevelSpec> {
        if text.trim().to_ascii_lowercase().starts_with("auto") {
            AutoTarget::parse(text).map(LevelSpec::Auto)
        } else {
            crate::quant::Level::parse(text).map(LevelSpec::Level)
        }
    }

    /// Splits a list into its levels and its search targets.
    pub fn split(specs: &[LevelSpec]) -> (Vec<crate::quant::Level>, Vec<AutoTarget>) {
        let levels = specs
            .iter()
            .filter_map(|s| match s {
                LevelSpec::Level(l) => Some(*l),
                LevelSpec::Auto(_) => None,
            })
            .collect();
        let targets = specs
            .iter()
            .filter_map(|s| match s {
                LevelSpec::Auto(t) => Some(*t),
                LevelSpec::Level(_) => None,
            })
            .collect();
        (levels, targets)
    }
}

impl std::str::FromStr for LevelSpec {
    type Err = Error;
    fn from_str(text: &str) -> Result<LevelSpec> {
        LevelSpec::parse(text)
    }
}

/// One way to store a layer: its total stored bits (codes, scales, zero points) and the damage of that choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerOption {
    pub bits: u64,
    pub damage: f64,
}

/// A layer's options, in a fixed order (the caller's: the index chosen refers to it).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerChoices {
    pub options: Vec<LayerOption>,
}

/// The chosen option index per layer, with the totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub choice: Vec<usize>,
    pub bits: u64,
    pub damage: f64,
}

/// Cost units of the table: the budget is cut into at most this many (more is finer and slower).
const UNITS: u64 = 200_000;

/// The least summed damage with summed bits at most `budget_bits`; `None` when even the cheapest options exceed
/// it. Every layer must have at least one option.
pub fn least_damage_within(layers: &[LayerChoices], budget_bits: u64) -> Result<Option<Selection>> {
    check(layers)?;
    let unit = budget_bits.div_ceil(UNITS).max(1);
    let capacity = (budget_bits / unit) as usize;
    let table = Table::build(layers, unit, capacity);
    Ok(table.best_within(capacity).map(|c| table.selection(layers, c)))
}

/// The selection with the fewest bits whose summed damage is at most `max_damage`; `None` when even the least
/// damaging options exceed it.
pub fn fewest_bits_within(layers: &[LayerChoices], max_damage: f64) -> Result<Option<Selection>> {
    check(layers)?;
    let most: u64 = layers
        .iter()
        .map(|l| l.options.iter().map(|o| o.bits).max().unwrap_or(0))
        .sum();
    let unit = most.div_ceil(UNITS).max(1);
    let capacity = most.div_ceil(unit) as usize + layers.len();
    let table = Table::build(layers, unit, capacity);
    // The smallest cost at which the least damage is within the limit (damage only falls as the cost grows).
    let found = (0..=capacity).find(|&c| table.damage[c] <= max_damage + 1e-12);
    Ok(found.map(|c| table.selection(layers, c)))
}

fn check(layers: &[LayerChoices]) -> Result<()> {
    match layers.iter().position(|l| l.options.is_empty()) {
        Some(i) => Err(Error::internal(format!(
            "mixed-precision search: layer {i} has no option"
        ))),
        None => match layers.iter().flat_map(|l| &l.options).find(|o| !o.damage.is_finite()) {
            Some(o) => Err(Error::invalid(
                "mixed-precision search",
                format!("a layer's damage is {} (every score must be finite)", o.damage),
            )),
            None => Ok(()),
        },
    }
}

/// `damage[c]`: the least damage with rounded-up cost at most `c`, and for each layer the option taken, so the
/// selection is read back from the last layer to the first.
struct Table {
    unit: u64,
    damage: Vec<f64>,
    /// `taken[layer][c]`: the option of `layer` in the best selection of layers `0..=layer` with cost at most `c`.
    taken: Vec<Vec<u16>>,
}

impl Table {
    fn build(layers: &[LayerChoices], unit: u64, capacity: usize) -> Table {
        let mut damage = vec![0.0f64; capacity + 1];
        let mut taken = Vec::with_capacity(layers.len());
        for layer in layers {
            let mut next = vec![f64::INFINITY; capacity + 1];
            let mut pick = vec![u16::MAX; capacity + 1];
            // Cheaper options first, so that on equal damage the cheaper (then the earlier) one is kept.
            let mut order: Vec<usize> = (0..layer.options.len()).collect();
            order.sort_by_key(|&i| (layer.options[i].bits, i));
            for c in 0..=capacity {
                for &i in &order {
                    let cost = layer.options[i].bits.div_ceil(unit) as usize;
                    if cost > c {
                        continue;
                    }
                    let d = damage[c - cost] + layer.options[i].damage;
                    if d < next[c] {
                        next[c] = d;
                        pick[c] = i as u16;
                    }
                }
            }
            damage = next;
            taken.push(pick);
        }
        Table { unit, damage, taken }
    }

    /// The smallest cost reaching the least damage within `capacity`.
    fn best_within(&self, capacity: usize) -> Option<usize> {
        let best = self.damage[capacity];
        if !best.is_finite() {
            return None;
        }
        (0..=capacity).find(|&c| self.damage[c] <= best)
    }

    fn selection(&self, layers: &[LayerChoices], mut c: usize) -> Selection {
        let mut choice = vec![0; layers.len()];
        for (i, layer) in layers.iter().enumerate().rev() {
            let pick = self.taken[i][c] as usize;
            choice[i] = pick;
            c -= layer.options[pick].bits.div_ceil(self.unit) as usize;
        }
        let bits = choice.iter().zip(layers).map(|(&i, l)| l.options[i].bits).sum();
        let damage = choice.iter().zip(layers).map(|(&i, l)| l.options[i].damage).sum();
        Selection { choice, bits, damage }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(options: &[(u64, f64)]) -> LayerChoices {
        LayerChoices {
            options: options
                .iter()
                .map(|&(bits, damage)| LayerOption { bits, damage })
                .collect(),
        }
    }

    /// Every combination, for checking the table on small cases.
    fn brute_force(
        layers: &[LayerChoices],
        fits: impl Fn(u64, f64) -> bool,
        better: impl Fn(&Selection, &Selection) -> bool,
    ) -> Option<Selection> {
        let mut best: Option<Selection> = None;
        let mut choice = vec![0usize; layers.len()];
        loop {
            let bits = choice.iter().zip(layers).map(|(&i, l)| l.options[i].bits).sum();
            let damage = choice.iter().zip(layers).map(|(&i, l)| l.options[i].damage).sum();
            let s = Selection {
                choice: choice.clone(),
                bits,
                damage,
            };
            if fits(bits, damage) && best.as_ref().is_none_or(|b| better(&s, b)) {
                best = Some(s);
            }
            let mut k = 0;
            loop {
                if k == layers.len() {
                    return best;
                }
                choice[k] += 1;
                if choice[k] < layers[k].options.len() {
                    break;
                }
                choice[k] = 0;
                k += 1;
            }
        }
    }

    fn random_layers(seed: u64, n: usize) -> Vec<LayerChoices> {
        let mut rng = crate::quant::testing::SplitMix(seed);
        (0..n)
            .map(|_| {
                let params = 100 + rng.next_u64() % 5000;
                // int2, int4, int8, f32 with falling damage (not always convex in bits).
                let d2 = rng.uniform() * 5.0;
                let d4 = d2 * rng.uniform();
                let d8 = d4 * rng.uniform() * 0.3;
                layer(&[(params * 3, d2), (params * 5, d4), (params * 9, d8), (params * 32, 0.0)])
            })
            .collect()
    }

    #[test]
    fn the_budget_is_never_exceeded_and_the_best_combination_is_found() {
        for (seed, scale) in (0..40).zip([1u64, 1000].into_iter().cycle()) {
            let mut layers = random_layers(seed, 6);
            // Large layers make the table's unit more than one bit: the result may then leave at most one unit per
            // layer unused, never more, and never exceed the budget.
            for l in &mut layers {
                l.options.iter_mut().for_each(|o| o.bits *= scale);
            }
            let all_int4: u64 = layers.iter().map(|l| l.options[1].bits).sum();
            for budget in [
                all_int4 * 6 / 10,
                all_int4 * 6 / 10 + 7 * scale,
                all_int4,
                all_int4 * 3 / 2,
            ] {
                let best = |budget: u64| brute_force(&layers, |b, _| b <= budget, |a, b| a.damage < b.damage - 1e-12);
                let slack = budget.div_ceil(UNITS) * layers.len() as u64;
                let got = least_damage_within(&layers, budget).unwrap();
                match got {
                    Some(g) => {
                        assert!(g.bits <= budget, "seed {seed}: {} bits over {budget}", g.bits);
                        let exact = best(budget).unwrap();
                        assert!(g.damage >= exact.damage - 1e-9, "seed {seed}: beats the optimum?");
                        if let Some(tighter) = best(budget.saturating_sub(slack)) {
                            assert!(
                                g.damage <= tighter.damage + 1e-9,
                                "seed {seed}: worse than within {slack} bits"
                            );
                        }
                        if slack == layers.len() as u64 {
                            assert!(
                                (g.damage - exact.damage).abs() < 1e-9,
                                "seed {seed}: one-bit units are exact"
                            );
                        }
                    }
                    None => assert!(
                        best(budget.saturating_sub(slack)).is_none(),
                        "seed {seed}: missed a selection"
                    ),
                }
            }
        }
    }

    #[test]
    fn the_fewest_bits_within_a_damage_limit() {
        for seed in 0..40 {
            let layers = random_layers(seed + 100, 6);
            for limit in [0.0, 0.5, 2.0, 100.0] {
                let got = fewest_bits_within(&layers, limit).unwrap().unwrap();
                assert!(
                    got.damage <= limit + 1e-9,
                    "seed {seed}: damage {} over {limit}",
                    got.damage
                );
                let want = brute_force(&layers, |_, d| d <= limit + 1e-12, |a, b| a.bits < b.bits).unwrap();
                // Costs are counted in units of the table: within one unit per layer of the fewest bits.
                let most: u64 = layers
                    .iter()
                    .map(|l| l.options.iter().map(|o| o.bits).max().unwrap())
                    .sum();
                let slack = most.div_ceil(UNITS) * layers.len() as u64;
                assert!(
                    got.bits >= want.bits && got.bits <= want.bits + slack,
                    "seed {seed}, limit {limit}"
                );
            }
        }
    }

    #[test]
    fn the_search_is_deterministic_and_prefers_cheaper_ties() {
        let layers = vec![
            layer(&[(10, 1.0), (20, 1.0), (40, 0.0)]),
            layer(&[(10, 0.5), (30, 0.5)]),
        ];
        let a = least_damage_within(&layers, 30).unwrap().unwrap();
        assert_eq!(a.choice, vec![0, 0], "equal damage: the cheaper options");
        assert_eq!(a, least_damage_within(&layers, 30).unwrap().unwrap());
        assert_eq!(least_damage_within(&layers, 50).unwrap().unwrap().choice, vec![2, 0]);
        assert!(
            least_damage_within(&layers, 19).unwrap().is_none(),
            "below the cheapest total"
        );
        assert!(
            fewest_bits_within(&layers, 0.4).unwrap().is_none(),
            "no choice damages less than 0.5"
        );
    }

    #[test]
    fn targets_parse_and_bad_ones_are_one_line_errors() {
        assert_eq!(AutoTarget::parse("auto:bits=3.5").unwrap(), AutoTarget::Bits(3.5));
        assert_eq!(
            AutoTarget::parse("auto:max-drop=0.5").unwrap(),
            AutoTarget::MaxDrop(0.5)
        );
        assert_eq!(AutoTarget::parse("auto:bits=3.5").unwrap().name(), "auto-bits3.5");
        for bad in [
            "auto:bits=0.5",
            "auto:bits=x",
            "auto:size=3",
            "auto:max-drop=-1",
            "auto:bits",
        ] {
            let e = AutoTarget::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && !e.contains('\n'), "{e}");
        }
    }
}
