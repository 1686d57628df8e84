//! Declarative edits of activations (zero, mean, patch, add, scale, replace), applied by the
//! forward pass itself at their hook points, with no call back into the caller: the core of the
//! Python package's `hooked_encoder.interventions`.
//!
//! An edit is a selection (a mask broadcast against the activation) and what the selected
//! entries become. The caller resolves its selectors (heads, positions, rows, query and key
//! positions) into the mask before the pass, so the pass only masks and selects.

use candle_core::{DType, Tensor};

use crate::{Error, HookPoint, Result};

/// What the selected entries of an activation become.
#[derive(Debug, Clone)]
pub enum EditOp {
    /// `value` (zero, mean or replacement values, or a patch from another run), broadcast
    /// against the activation.
    Set(Tensor),
    /// The activation times `value` (a scalar or a broadcastable tensor).
    Scale(Tensor),
    /// The activation plus `value` (a steering vector times its scale).
    Add(Tensor),
    /// The same activation of other rows of the batch: row `i` takes row `rows[i]`'s (a patch
    /// from another input of the same batch).
    FromRows(Vec<u32>),
}

/// One edit at one hook point.
#[derive(Debug, Clone)]
pub struct Edit {
    /// Where the edit applies.
    pub point: HookPoint,
    /// Where it applies there: nonzero entries are edited; broadcast against the activation
    /// (`u8`).
    pub mask: Tensor,
    /// What the edited entries become.
    pub op: EditOp,
}

impl Edit {
    /// `activation` with the selected entries edited; the others are left exactly as they were
    /// (a masked attention score stays `-inf`).
    pub fn apply(&self, activation: Tensor) -> Result<Tensor> {
        let shape = activation.shape().clone();
        let refuse = |what: &str, dims: &[usize]| {
            Error::Input(format!(
            "the edit at {}: its {what} of shape {dims:?} does not broadcast to the activation's \
             shape {:?}",
            self.point.name(),
            shape.dims()
        ))
        };
        let device = activation.device().clone();
        let value = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_device(&device)?.to_dtype(activation.dtype())?;
            t.broadcast_as(&shape)
                .map_err(|_| refuse("value", t.dims()))
        };
        let edited = match &self.op {
            EditOp::Set(v) => value(v)?,
            EditOp::Scale(v) => (&activation * value(v)?)?,
            EditOp::Add(v) => (&activation + value(v)?)?,
            EditOp::FromRows(rows) => {
                let batch = shape.dims().first().copied().unwrap_or(0);
                if rows.len() != batch || rows.iter().any(|r| *r as usize >= batch) {
                    return Err(Error::Input(format!(
                        "the edit at {}: from_rows must give one source row in 0..{batch} for \
                         each of the {batch} rows, got {rows:?}",
                        self.point.name()
                    )));
                }
                let index = Tensor::from_slice(rows, rows.len(), &device)?;
                activation.index_select(&index, 0)?
            }
        };
        let mask = self
            .mask
            .to_device(&device)?
            .to_dtype(DType::U8)?
            .broadcast_as(&shape)
            .map_err(|_| refuse("mask", self.mask.dims()))?;
        Ok(mask.where_cond(&edited, &activation)?)
    }

    /// The gradient to the activation before the edit from `grad`, the gradient to the one
    /// after it: zero where a value was set, times the factor where scaled, unchanged where
    /// added to; a row patched from another row sends its gradient there.
    pub fn backward(&self, grad: Tensor) -> Result<Tensor> {
        let shape = grad.shape().clone();
        let device = grad.device().clone();
        let mask = self
            .mask
            .to_device(&device)?
            .to_dtype(DType::U8)?
            .broadcast_as(&shape)?;
        let zeros = grad.zeros_like()?;
        Ok(match &self.op {
            EditOp::Add(_) => grad,
            EditOp::Set(_) => mask.where_cond(&zeros, &grad)?,
            EditOp::Scale(v) => {
                let v = v
                    .to_device(&device)?
                    .to_dtype(grad.dtype())?
                    .broadcast_as(&shape)?;
                mask.where_cond(&(&grad * v)?, &grad)?
            }
            EditOp::FromRows(rows) => {
                // Selected entries of row i came from row rows[i]: their gradient goes there.
                let moved = mask.where_cond(&grad, &zeros)?;
                let index = Tensor::from_slice(rows, rows.len(), &device)?;
                mask.where_cond(&zeros, &grad)?
                    .index_add(&index, &moved, 0)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::BlockHook;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn each_op_edits_only_the_selected_entries() {
        let cpu = Device::Cpu;
        let point = HookPoint::Block(0, BlockHook::Z);
        // [batch 2, pos 2]; the mask selects column 1 of every row.
        let x = Tensor::new(&[[1f32, 2.0], [3.0, f32::NEG_INFINITY]], &cpu).unwrap();
        let mask = Tensor::new(&[[0u8, 1]], &cpu).unwrap();
        let edit = |op| Edit {
            point,
            mask: mask.clone(),
            op,
        };
        let scalar = |v: f32| Tensor::new(v, &cpu).unwrap();
        let set = edit(EditOp::Set(scalar(0.0))).apply(x.clone()).unwrap();
        assert_eq!(values(&set), [1.0, 0.0, 3.0, 0.0]);
        let scaled = edit(EditOp::Scale(scalar(2.0))).apply(x.clone()).unwrap();
        assert_eq!(values(&scaled), [1.0, 4.0, 3.0, f32::NEG_INFINITY]);
        let added = edit(EditOp::Add(Tensor::new(&[10f32, 20.0], &cpu).unwrap()))
            .apply(x.clone())
            .unwrap();
        assert_eq!(values(&added), [1.0, 22.0, 3.0, f32::NEG_INFINITY]);
        let patched = edit(EditOp::FromRows(vec![1, 1])).apply(x.clone()).unwrap();
        assert_eq!(
            values(&patched),
            [1.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]
        );
        // Unselected -inf stays -inf even under a zero.
        let all_but = Edit {
            point,
            mask: Tensor::new(&[[1u8, 0]], &cpu).unwrap(),
            op: EditOp::Set(scalar(0.0)),
        };
        assert_eq!(
            values(&all_but.apply(x.clone()).unwrap()),
            [0.0, 2.0, 0.0, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn each_backward_is_the_transpose_of_its_edit() {
        // For a linear edit e, <e(x + d) - e(x), g> = <d, backward(g)> for every d and g.
        let cpu = Device::Cpu;
        let point = HookPoint::Block(0, BlockHook::ResidMid);
        let x = Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 4.0, -1.0]], &cpu).unwrap();
        let d = Tensor::new(&[[0.3f32, 0.1, -0.7], [0.2, -0.4, 0.9]], &cpu).unwrap();
        let g = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 2.0]], &cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 0, 1]], &cpu).unwrap();
        let dot = |a: &Tensor, b: &Tensor| -> f32 {
            values(a).iter().zip(values(b)).map(|(x, y)| x * y).sum()
        };
        for op in [
            EditOp::Set(Tensor::new(5f32, &cpu).unwrap()),
            EditOp::Scale(Tensor::new(&[2f32, 3.0, -1.0], &cpu).unwrap()),
            EditOp::Add(Tensor::new(1f32, &cpu).unwrap()),
            EditOp::FromRows(vec![1, 1]),
        ] {
            let edit = Edit {
                point,
                mask: mask.clone(),
                op,
            };
            let change =
                (edit.apply((&x + &d).unwrap()).unwrap() - edit.apply(x.clone()).unwrap()).unwrap();
            let back = edit.backward(g.clone()).unwrap();
            assert!(
                (dot(&change, &g) - dot(&d, &back)).abs() < 1e-5,
                "{:?}",
                edit.op
            );
        }
    }

    #[test]
    fn misfitting_values_masks_and_rows_are_refused_by_point_name() {
        let cpu = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &cpu).unwrap();
        let point = HookPoint::Block(1, BlockHook::ResidPre);
        let bad_value = Edit {
            point,
            mask: Tensor::ones((1, 1), DType::U8, &cpu).unwrap(),
            op: EditOp::Add(Tensor::zeros(4, DType::F32, &cpu).unwrap()),
        };
        let err = bad_value.apply(x.clone()).unwrap_err().to_string();
        assert!(
            err.contains("blocks.1.hook_resid_pre") && err.contains("value"),
            "{err}"
        );
        let bad_rows = Edit {
            op: EditOp::FromRows(vec![0, 2]),
            ..bad_value
        };
        let err = bad_rows.apply(x).unwrap_err().to_string();
        assert!(err.contains("from_rows"), "{err}");
    }
}
