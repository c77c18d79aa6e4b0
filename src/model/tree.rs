//! The one walk over a model's module tree. Each module lists its children once, under the names transformers gives
//! them ([`node!`]), and the walk hands every leaf (a Linear, Conv2d, LayerNorm, BatchNorm2d, or the attention kernel
//! choice) to a visitor with its [`Path`]. Loading (`model::load`), saving (`save::state_dict`),
//! `Segformer::layers` (`segq inspect`), quantization and `Segformer::prepare` are all visitors of this walk, so
//! adding a layer is one line in its parent's list.
//!
//! Loading builds the tree from the config (shapes, parameters zero) and then fills it through this same walk, rather
//! than building it with candle-style `new(vb.pp("name"))` constructors: with constructors every weight name would be
//! written once for loading and again for each of the other walks.

use std::fmt;

use super::layers::{BatchNorm2d, Conv2d, LayerNorm, Linear, Param, ParamMut};
use super::plan::AttentionKernel;
use crate::Result;

/// A module's weight-name prefix (`segformer.encoder.block.0.1.attention.self`), extended per child as in
/// candle's `VarBuilder::pp`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    pub fn root() -> Path {
        Path::default()
    }

    /// The path of child `segment` (which may itself be dotted, like `output.dense`; an empty segment is this path).
    pub fn pp(&self, segment: impl fmt::Display) -> Path {
        let segment = segment.to_string();
        match (self.0.is_empty(), segment.is_empty()) {
            (_, true) => self.clone(),
            (true, false) => Path(segment),
            (false, false) => Path(format!("{}.{segment}", self.0)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A leaf of the tree, read-only.
pub enum Leaf<'a> {
    Linear(&'a Linear),
    Conv2d(&'a Conv2d),
    LayerNorm(&'a LayerNorm),
    BatchNorm2d(&'a BatchNorm2d),
    /// No parameters: visited so that `prepare` sets it by the same walk as the weights.
    Attention(&'a AttentionKernel),
}

/// A leaf of the tree, to fill, quantize or plan (crate-internal: the plan must stay in step with the weights).
pub(crate) enum LeafMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
    LayerNorm(&'a mut LayerNorm),
    BatchNorm2d(&'a mut BatchNorm2d),
    Attention(&'a mut AttentionKernel),
}

impl<'a> Leaf<'a> {
    /// The leaf's parameters, named under its path (`weight`, `bias`, ...), in checkpoint order.
    pub fn params(self) -> Vec<(&'static str, Param<'a>)> {
        match self {
            Leaf::Linear(l) => l.params(),
            Leaf::Conv2d(c) => c.params(),
            Leaf::LayerNorm(n) => n.params(),
            Leaf::BatchNorm2d(b) => b.params(),
            Leaf::Attention(_) => Vec::new(),
        }
    }
}

impl<'a> LeafMut<'a> {
    pub(crate) fn params_mut(self) -> Vec<(&'static str, ParamMut<'a>)> {
        match self {
            LeafMut::Linear(l) => l.params_mut(),
            LeafMut::Conv2d(c) => c.params_mut(),
            LeafMut::LayerNorm(n) => n.params_mut(),
            LeafMut::BatchNorm2d(b) => b.params_mut(),
            LeafMut::Attention(_) => Vec::new(),
        }
    }
}

/// What [`Node::visit`] calls for every leaf (which it may keep: leaves borrow the tree for `'a`).
pub type Visitor<'a, 'v> = dyn FnMut(&Path, Leaf<'a>) -> Result<()> + 'v;
/// What [`NodeMut::visit_mut`] calls for every leaf.
pub(crate) type VisitorMut<'v> = dyn FnMut(&Path, LeafMut<'_>) -> Result<()> + 'v;

/// A module of the tree: calls the visitor for each leaf below it, in checkpoint order.
pub trait Node {
    fn visit<'a>(&'a self, path: &Path, v: &mut Visitor<'a, '_>) -> Result<()>;
}

/// The same walk with mutable leaves, for loading, quantization and `Segformer::prepare` only: outside the crate a
/// model changes only through those, which keep its kernels and composed head in step with its weights.
pub(crate) trait NodeMut {
    fn visit_mut(&mut self, path: &Path, v: &mut VisitorMut<'_>) -> Result<()>;
}

/// Implements [`Node`] and [`NodeMut`] for a module from one list of `segment => field` children, visited in that
/// order: `visit` and `visit_mut` are the same list. A segment is any `Display` appended to the module's path (`""`
/// keeps the path, for a child whose leaves sit directly under it); `$s` names the module inside segment expressions.
macro_rules! node {
    ($ty:ty, |$s:ident, $p:ident| { $($seg:expr => $field:ident),* $(,)? }) => {
        impl $crate::model::tree::Node for $ty {
            fn visit<'a>(
                &'a self,
                $p: &$crate::model::tree::Path,
                v: &mut $crate::model::tree::Visitor<'a, '_>,
            ) -> $crate::Result<()> {
                let $s = self;
                $({
                    let path = $p.pp($seg);
                    $crate::model::tree::Node::visit(&$s.$field, &path, v)?;
                })*
                Ok(())
            }
        }

        impl $crate::model::tree::NodeMut for $ty {
            fn visit_mut(
                &mut self,
                $p: &$crate::model::tree::Path,
                v: &mut $crate::model::tree::VisitorMut<'_>,
            ) -> $crate::Result<()> {
                let $s = self;
                $({
                    let path = $p.pp($seg);
                    $crate::model::tree::NodeMut::visit_mut(&mut $s.$field, &path, v)?;
                })*
                Ok(())
            }
        }
    };
}
pub(crate) use node;

macro_rules! leaf {
    ($ty:ty, $variant:ident) => {
        impl Node for $ty {
            fn visit<'a>(&'a self, path: &Path, v: &mut Visitor<'a, '_>) -> Result<()> {
                v(path, Leaf::$variant(self))
            }
        }

        impl NodeMut for $ty {
            fn visit_mut(&mut self, path: &Path, v: &mut VisitorMut<'_>) -> Result<()> {
                v(path, LeafMut::$variant(self))
            }
        }
    };
}
leaf!(Linear, Linear);
leaf!(Conv2d, Conv2d);
leaf!(LayerNorm, LayerNorm);
leaf!(BatchNorm2d, BatchNorm2d);
leaf!(AttentionKernel, Attention);

/// A list of modules named by index (`linear_c.0`, `block.1.0`), as PyTorch's `nn.ModuleList`.
impl<T: Node> Node for Vec<T> {
    fn visit<'a>(&'a self, path: &Path, v: &mut Visitor<'a, '_>) -> Result<()> {
        self.iter().enumerate().try_for_each(|(i, m)| m.visit(&path.pp(i), v))
    }
}

impl<T: NodeMut> NodeMut for Vec<T> {
    fn visit_mut(&mut self, path: &Path, v: &mut VisitorMut<'_>) -> Result<()> {
        self.iter_mut()
            .enumerate()
            .try_for_each(|(i, m)| m.visit_mut(&path.pp(i), v))
    }
}

/// A module the config may leave out (the spatial reduction of attention at sr_ratio 1).
impl<T: Node> Node for Option<T> {
    fn visit<'a>(&'a self, path: &Path, v: &mut Visitor<'a, '_>) -> Result<()> {
        self.as_ref().map_or(Ok(()), |m| m.visit(path, v))
    }
}

impl<T: NodeMut> NodeMut for Option<T> {
    fn visit_mut(&mut self, path: &Path, v: &mut VisitorMut<'_>) -> Result<()> {
        self.as_mut().map_or(Ok(()), |m| m.visit_mut(path, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_segments_with_dots() {
        let p = Path::root().pp("segformer.encoder").pp("block").pp(2).pp("").pp(0);
        assert_eq!(p.as_str(), "segformer.encoder.block.2.0");
        assert_eq!(Path::root().pp("").as_str(), "");
    }
}
