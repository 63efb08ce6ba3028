//! Pooled release: the hospitals' raw cells summed under secure
//! aggregation, with distributed noise, and disclosure control applied to
//! the federation's table.
//!
//! Each node lays its full table out as one vector of integers
//! ([`Layout`]): per cell, the patients of a count or histogram bin; a
//! rate's events and population; a summary's n, sum and sum of squares of
//! its values in fixed point (and, exact only, the patients without a
//! value). To that it adds its share of the noise ([`Layout::noise`]):
//! discrete Gaussian draws (Canonne, Kamath & Steinke 2020, OpenDP's exact
//! sampler) of variance `1/n` of the calibrated total, so that the sum over
//! `n` nodes carries the whole. The vector is masked and summed; the
//! coordinator reads the sum ([`Layout::decode`]) and releases it through
//! the same suppression and secondary suppression a node applies to its
//! own table, deciding on the noisy totals (post-processing).
//!
//! Accounting ([`calibrate`]): a patient is in one cell, and moves each
//! number of that cell by at most its sensitivity (1 for counts, the clip
//! bound for a sum, its square for a sum of squares), so with the noise of
//! each number scaled to its sensitivity the table has zCDP
//! `rho = sum over numbers of eps_j^2 / 2`, where for a sum of `n`
//! independent discrete Gaussians of scale `sigma` each (Kairouz, Liu &
//! Steinke 2021, Theorem 14) `eps_j = min(sqrt(1/(n sigma^2) + tau d / 2),
//! 1/(sqrt(n) sigma) + tau d)` (the paper's `tau sqrt(d)` widened to `tau d`, conservatively) with `tau = 10 sum_{k=1}^{n-1}
//! exp(-2 pi^2 sigma^2 k/(k+1))` and `d` the cells. `rho` converts to
//! `(epsilon, delta)` with OpenDP's zCDP conversion; the scale is the
//! smallest that meets the query's `(epsilon, delta)`. Against a
//! coordinator that colludes with every other hospital, one hospital's
//! numbers carry only its own share: [`Calibration::collusion_epsilon`]
//! says what that gives, and results state it.

use std::collections::HashMap;

use dashu::integer::IBig;
use dashu::rational::RBig;
use ghx_study::query::{Analysis, Noise, QuerySpec};
use ghx_study::result::{Moments, RateCounts};
use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::AtomDomain;
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::AbsoluteDistance;
use opendp::traits::samplers::sample_discrete_gaussian;

use crate::{Candidate, Raw, RawCell};

/// Why a pooled table could not be laid out, noised or read.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("the table has a cell `{0}` outside the query's full table")]
    UnknownCell(String),
    #[error("a pooled vector of {got} numbers for a table laid out in {expected}")]
    Length { got: usize, expected: usize },
    #[error("a pooled sum overflows 64-bit fixed point; narrow the clip range")]
    Overflow,
    #[error("noise: {0}")]
    Noise(String),
    #[error(
        "every slot of a distinct count's bitmap is occupied: too few slots for the cell (ask for more linkage_slots), or hospitals holding different link keys"
    )]
    Saturated,
    #[error(
        "the noise would fill {load:.0}% of each distinct count's {slots} slots with phantoms; ask for more linkage_slots or a larger epsilon"
    )]
    PhantomLoad { load: f64, slots: usize },
    #[error("a table that counts each patient once is laid out with its query key, and only it")]
    QueryKey,
    #[error("cell `{0}` has {1} counts; the table's cells have {2}")]
    Counts(String, usize, usize),
    #[error(
        "epsilon {epsilon} at delta {delta:e} cannot be met by distributed discrete Gaussian noise over {nodes} nodes"
    )]
    Unreachable {
        epsilon: f64,
        delta: f64,
        nodes: usize,
    },
}

/// The cell size a pooled table over `nodes` is held to: the largest the
/// manifest sets for any of them (and each node refuses a pooled table
/// held to less than its own).
pub fn cell_size(manifest: &ghx_study::manifest::StudyManifest, nodes: &[String]) -> u32 {
    nodes
        .iter()
        .map(|n| manifest.min_cell_size.for_node(n))
        .max()
        .unwrap_or(manifest.min_cell_size.default)
}

/// Fixed-point units per unit of a summary's variable: a power of ten such
/// that the clip bound in units is at most 2^20, so that a sum of squares
/// over a million patients stays below 2^60.
fn resolution(bound: f64) -> f64 {
    let mut r = 1e6;
    while r > 1e-6 && bound * r > f64::from(1u32 << 20) {
        r /= 10.0;
    }
    r
}

/// How a query's full table is laid out as one vector of integers.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The full table's keys ([`QuerySpec::table_keys`]).
    pub keys: Vec<Vec<String>>,
    kind: Kind,
    /// Counting each patient once: the slots of each count's bitmap
    /// ([`crate::linkage`]).
    slots: Option<usize>,
}

/// The patients behind one cell's counts, as their 64-bit slot hashes
/// ([`crate::linkage::QueryKey`]): per count of the cell (a rate's events,
/// then its population).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedCell {
    pub key: Vec<String>,
    pub counts: Vec<Vec<u64>>,
}

/// What the coordinator reads of a linked table besides its cells.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedRead {
    /// Slots per bitmap.
    pub slots: usize,
    /// Patients without a linkage token, counted at each hospital that has
    /// them (noisy when the table is).
    pub unlinked: i64,
    /// Linear counting's standard error of each cell's counts (its largest
    /// count's), in patients, in the order of the layout's keys.
    pub errors: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Rate,
    /// Values in units of `1/resolution`, within `bound` of zero after
    /// clipping; `lacking` when exact.
    Summary {
        resolution: f64,
        bound: f64,
        min: f64,
        max: f64,
        lacking: bool,
    },
}

impl Layout {
    /// The layout of `spec`'s table (a pooled summary has a clip range:
    /// the query's validation requires it).
    pub fn of(spec: &QuerySpec) -> Layout {
        let kind = match &spec.analysis {
            Analysis::Count { .. } | Analysis::Histogram { .. } => Kind::Count,
            Analysis::Rate { .. } => Kind::Rate,
            Analysis::Summary { clip, .. } => {
                let (min, max) = clip.map_or((-1e6, 1e6), |c| (c.min, c.max));
                let bound = min.abs().max(max.abs());
                Kind::Summary {
                    resolution: resolution(bound),
                    bound,
                    min,
                    max,
                    lacking: spec.noise.is_none(),
                }
            }
        };
        Layout {
            keys: spec.table_keys(),
            kind,
            slots: spec.linkage_slots().map(|s| s as usize),
        }
    }

    /// Whether each patient counts once (bitmaps rather than counts).
    pub fn linked(&self) -> bool {
        self.slots.is_some()
    }

    /// Numbers per cell.
    pub fn per_cell(&self) -> usize {
        match self.kind {
            Kind::Count => 1,
            Kind::Rate => 2,
            Kind::Summary { lacking, .. } => 3 + usize::from(lacking),
        }
    }

    /// Length of the vector.
    pub fn dim(&self) -> usize {
        match self.slots {
            Some(m) => self.keys.len() * self.per_cell() * m + 1,
            None => self.keys.len() * self.per_cell(),
        }
    }

    /// The table's zCDP when each number's noise, summed over `nodes`
    /// nodes, has scale `sigma` per unit of sensitivity: its cells' numbers
    /// and, counting each patient once, the count of patients without a
    /// token.
    fn rho(&self, sigma: f64, nodes: usize) -> f64 {
        let d = self.keys.len().max(1);
        match self.slots {
            // The unlinked count is one more dimension of the table.
            Some(_) => {
                rho_of(sigma, nodes, self.per_cell(), d + 1) + rho_of(sigma, nodes, 1, d + 1)
            }
            None => rho_of(sigma, nodes, self.per_cell(), d),
        }
    }

    /// Which bitmap count `j` of the cell `key` is, when each patient
    /// counts once (what a patient's slot in it is keyed by).
    pub fn bitmap(&self, key: &[String], j: usize) -> Option<usize> {
        let at = self.keys.iter().position(|k| k == key)?;
        (j < self.per_cell()).then(|| at * self.per_cell() + j)
    }

    /// Refuses noise whose phantoms would fill more than a quarter of each
    /// bitmap (the estimate would be poor, or every slot occupied): before
    /// any node pays for it.
    pub fn check_load(&self, calibration: &Calibration) -> Result<(), Error> {
        let Some(m) = self.slots else { return Ok(()) };
        let load = (phantom_shift(calibration) as f64 * calibration.nodes as f64) / m as f64;
        if load > 0.25 {
            return Err(Error::PhantomLoad {
                load: 100.0 * load,
                slots: m,
            });
        }
        Ok(())
    }

    /// Numbers one patient moves: those of their cell and, counting each
    /// patient once, the count of patients without a token.
    fn numbers(&self) -> usize {
        self.per_cell() + usize::from(self.linked())
    }

    /// A node's patients as the bitmaps it contributes, before noise: each
    /// count of each cell a bitmap of its patients' slots, then the count
    /// of its cohort's patients without a token.
    pub fn encode_linked(&self, cells: &[LinkedCell], unlinked: u64) -> Result<Vec<i64>, Error> {
        let m = self.slots.ok_or(Error::Length {
            got: 0,
            expected: self.dim(),
        })?;
        let per = self.per_cell();
        let mut out = vec![0i64; self.dim()];
        for cell in cells {
            let at = self
                .keys
                .iter()
                .position(|k| *k == cell.key)
                .ok_or_else(|| Error::UnknownCell(cell.key.join("/")))?;
            if cell.counts.len() != per {
                return Err(Error::Counts(cell.key.join("/"), cell.counts.len(), per));
            }
            for (j, hashes) in cell.counts.iter().enumerate() {
                let start = (at * per + j) * m;
                crate::linkage::occupy(&mut out[start..start + m], hashes.iter().copied());
            }
        }
        *out.last_mut()
            .expect("a linked layout ends with its unlinked count") = to_i64(unlinked)?;
        Ok(out)
    }

    /// Each number's sensitivity: how far one patient moves it.
    fn sensitivities(&self) -> Vec<f64> {
        match self.kind {
            Kind::Count => vec![1.0],
            Kind::Rate => vec![1.0, 1.0],
            Kind::Summary {
                resolution,
                bound,
                lacking,
                ..
            } => {
                let units = (bound * resolution).ceil().max(1.0);
                let mut s = vec![1.0, units, units * units];
                if lacking {
                    s.push(1.0);
                }
                s
            }
        }
    }

    /// A node's raw cells as the vector it contributes, before noise.
    pub fn encode(&self, cells: &[RawCell]) -> Result<Vec<i64>, Error> {
        let index: HashMap<&[String], usize> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_slice(), i))
            .collect();
        let per = self.per_cell();
        let mut out = vec![0i64; self.dim()];
        for cell in cells {
            let at = *index
                .get(cell.key.as_slice())
                .ok_or_else(|| Error::UnknownCell(cell.key.join("/")))?
                * per;
            let slot = &mut out[at..at + per];
            match (&cell.value, self.kind) {
                (Raw::Count(n), _) => slot[0] = to_i64(*n)?,
                (Raw::Rate { events, population }, _) => {
                    slot[0] = to_i64(*events)?;
                    slot[1] = to_i64(*population)?;
                }
                (
                    Raw::Values(values),
                    Kind::Summary {
                        resolution,
                        min,
                        max,
                        ..
                    },
                ) => {
                    slot[0] = to_i64(values.len() as u64)?;
                    for v in values {
                        let units = (v.clamp(min, max) * resolution).round() as i64;
                        slot[1] = slot[1].checked_add(units).ok_or(Error::Overflow)?;
                        slot[2] = units
                            .checked_mul(units)
                            .and_then(|sq| slot[2].checked_add(sq))
                            .ok_or(Error::Overflow)?;
                    }
                }
                (Raw::Values(_), _) => return Err(Error::UnknownCell(cell.key.join("/"))),
            }
        }
        Ok(out)
    }

    /// The patients without a value of an exact summary's cells, written
    /// into `encoded` (the engine counts them apart from the cells).
    pub fn set_lacking(&self, encoded: &mut [i64], lacking: &[(Vec<String>, u64)]) {
        if !matches!(self.kind, Kind::Summary { lacking: true, .. }) {
            return;
        }
        let per = self.per_cell();
        for (key, n) in lacking {
            if let Some(i) = self.keys.iter().position(|k| k == key) {
                encoded[i * per + 3] = i64::try_from(*n).unwrap_or(i64::MAX);
            }
        }
    }

    /// One node's share of the noise: every number of every cell gets a
    /// discrete Gaussian draw of scale `calibration.per_node` times its
    /// sensitivity.
    pub fn noise(&self, calibration: &Calibration) -> Result<Vec<i64>, Error> {
        if let Some(m) = self.slots {
            return self.phantoms(calibration, m);
        }
        let sensitivities = self.sensitivities();
        let scales: Vec<RBig> = sensitivities
            .iter()
            .map(|s| {
                RBig::try_from(s * calibration.per_node)
                    .map_err(|_| Error::Noise("the noise scale is not a finite number".into()))
            })
            .collect::<Result<_, _>>()?;
        (0..self.dim())
            .map(|i| {
                let draw: IBig =
                    serialised(|| sample_discrete_gaussian(scales[i % scales.len()].clone()))
                        .map_err(|e| Error::Noise(e.to_string()))?;
                i64::try_from(draw).map_err(|_| Error::Overflow)
            })
            .collect()
    }

    /// A linked table's share of the noise: in each bitmap, `shift + Z`
    /// phantoms ([`crate::linkage::PHANTOM_SHIFT_SCALES`]), and a draw on
    /// the unlinked count.
    fn phantoms(&self, calibration: &Calibration, m: usize) -> Result<Vec<i64>, Error> {
        let draw = || -> Result<i64, Error> {
            let scale = RBig::try_from(calibration.per_node)
                .map_err(|_| Error::Noise("the noise scale is not a finite number".into()))?;
            let z: IBig = serialised(|| sample_discrete_gaussian(scale))
                .map_err(|e| Error::Noise(e.to_string()))?;
            i64::try_from(z).map_err(|_| Error::Overflow)
        };
        let shift = phantom_shift(calibration);
        let mut out = vec![0i64; self.dim()];
        let (bitmaps, last) = out.split_at_mut(self.dim() - 1);
        for bitmap in bitmaps.chunks_mut(m) {
            let n = (shift + draw()?).max(0) as u64;
            crate::linkage::phantoms(bitmap, n);
        }
        last[0] = draw()?;
        Ok(out)
    }

    /// A linked table's cells from the sum of the nodes' bitmaps: each
    /// count the union its bitmap shows, less the phantoms' shifts when
    /// noised; and what else the coordinator reads of it.
    pub fn decode_linked(
        &self,
        sum: &[i64],
        calibration: Option<&Calibration>,
    ) -> Result<(Vec<Candidate>, LinkedRead), Error> {
        let m = self.slots.ok_or(Error::Length {
            got: sum.len(),
            expected: self.dim(),
        })?;
        if sum.len() != self.dim() {
            return Err(Error::Length {
                got: sum.len(),
                expected: self.dim(),
            });
        }
        let shifts = calibration.map_or(0, |c| phantom_shift(c) * c.nodes as i64);
        let mut errors = vec![0f64; self.keys.len()];
        let mut counts = Vec::with_capacity(self.keys.len() * self.per_cell());
        for (i, bitmap) in sum[..sum.len() - 1].chunks(m).enumerate() {
            let union = crate::linkage::union_estimate(bitmap).ok_or(Error::Saturated)?;
            let error = &mut errors[i / self.per_cell()];
            *error = error.max(crate::linkage::standard_error(union, m));
            counts.push((union.round() as i64 - shifts).max(0) as u64);
        }
        let cells = counts
            .chunks(self.per_cell())
            .map(|c| match self.kind {
                Kind::Rate => Candidate::Rate(RateCounts {
                    events: c[0].min(c[1]),
                    population: c[1],
                }),
                _ => Candidate::Count(c[0]),
            })
            .collect();
        Ok((
            cells,
            LinkedRead {
                slots: m,
                unlinked: sum[sum.len() - 1],
                errors,
            },
        ))
    }

    /// The federation's table from the sum of the nodes' vectors, as the
    /// candidates disclosure control decides on: negative noisy counts
    /// read as zero, a rate's events at most its population, a summary's
    /// mean inside the clip range.
    pub fn decode(&self, sum: &[i64]) -> Result<Vec<Candidate>, Error> {
        if sum.len() != self.dim() {
            return Err(Error::Length {
                got: sum.len(),
                expected: self.dim(),
            });
        }
        let count = |v: i64| v.max(0) as u64;
        Ok(sum
            .chunks(self.per_cell())
            .map(|c| match self.kind {
                Kind::Count => Candidate::Count(count(c[0])),
                Kind::Rate => {
                    let population = count(c[1]);
                    Candidate::Rate(RateCounts {
                        events: count(c[0]).min(population),
                        population,
                    })
                }
                Kind::Summary {
                    resolution,
                    min,
                    max,
                    lacking,
                    ..
                } => {
                    let n = count(c[0]);
                    let moments = if n == 0 {
                        Moments::EMPTY
                    } else {
                        let nf = n as f64;
                        let mean = (c[1] as f64 / resolution / nf).clamp(min, max);
                        let sum_sq = c[2] as f64 / (resolution * resolution);
                        Moments {
                            n,
                            mean,
                            m2: (sum_sq - nf * mean * mean).max(0.0),
                            min: None,
                            max: None,
                        }
                    };
                    Candidate::Summary(moments, lacking.then(|| count(c[3])))
                }
            })
            .collect())
    }

    /// What a requester needs to read a pooled summary's numbers: the
    /// resolution of its fixed point.
    pub fn resolution_note(&self) -> Option<String> {
        match self.kind {
            Kind::Summary { resolution, .. } => Some(format!(
                "values: summed in fixed point to the nearest {}",
                1.0 / resolution
            )),
            _ => None,
        }
    }
}

/// Phantoms each node adds to a bitmap beyond its draw.
fn phantom_shift(calibration: &Calibration) -> i64 {
    (crate::linkage::PHANTOM_SHIFT_SCALES * calibration.per_node).ceil() as i64
}

fn to_i64(n: u64) -> Result<i64, Error> {
    i64::try_from(n).map_err(|_| Error::Overflow)
}

/// Reads a secure-aggregation sum (modulo 2^64) as signed integers.
pub fn from_ring(sum: &[u64]) -> Vec<i64> {
    sum.iter().map(|v| *v as i64).collect()
}

/// Writes signed integers into the secure-aggregation ring.
pub fn to_ring(values: &[i64]) -> Vec<u64> {
    values.iter().map(|v| *v as u64).collect()
}

/// The noise of a pooled release over `nodes` nodes at a query's
/// `(epsilon, delta)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub epsilon: f64,
    pub delta: f64,
    pub nodes: usize,
    /// Scale (standard deviation before discretisation) of each node's
    /// share, per unit of sensitivity.
    pub per_node: f64,
    /// Of the sum: `per_node * sqrt(nodes)`.
    pub total: f64,
    /// The zCDP of the released table.
    pub rho: f64,
    /// The epsilon (at the same delta) one node's numbers have against a
    /// coordinator that colludes with every other node and subtracts
    /// their shares.
    pub collusion_epsilon: f64,
}

impl Calibration {
    /// The statement results carry.
    pub fn describe(&self) -> String {
        let collusion = if self.collusion_epsilon.is_finite() {
            format!(
                "against the coordinator colluding with the other hospitals, each hospital's numbers keep epsilon {:.2}",
                self.collusion_epsilon
            )
        } else {
            "against the coordinator colluding with any one hospital (which holds the link key), counts of each patient once have no protection".to_owned()
        };
        format!(
            "distributed discrete Gaussian: each of {} hospitals adds a share of scale {:.3} per unit of sensitivity (1 for a count; the clip bound for a sum, its square for a sum of squares), the sum scale {:.3}; zCDP rho {:.5}, so epsilon {} at delta {:e} (Kairouz, Liu & Steinke 2021; OpenDP's conversion); {collusion}",
            self.nodes, self.per_node, self.total, self.rho, self.epsilon, self.delta,
        )
    }
}

/// Runs `f`, a call into OpenDP, one at a time in this process. OpenDP
/// 0.16's arithmetic silences panics by swapping the process's panic hook
/// for an empty one around each operation (`catch_unwind_silent`): two
/// threads doing so at once can leave the empty hook installed for good,
/// after which no panic anywhere in the node is reported. One at a time,
/// the previous hook is always restored.
fn serialised<R>(f: impl FnOnce() -> R) -> R {
    static OPENDP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = OPENDP.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// The epsilon at `delta` of zCDP `rho`, by OpenDP's conversion (a
/// discrete Gaussian of sensitivity 1 whose privacy map gives `rho`).
fn epsilon_of(rho: f64, delta: f64) -> Result<f64, Error> {
    serialised(|| epsilon_unserialised(rho, delta))
}

fn epsilon_unserialised(rho: f64, delta: f64) -> Result<f64, Error> {
    let fail = |e: opendp::error::Error| Error::Noise(e.to_string());
    let scale = (1.0 / (2.0 * rho)).sqrt();
    let gaussian =
        make_gaussian::<AtomDomain<i64>, AbsoluteDistance<i64>, ZeroConcentratedDivergence>(
            AtomDomain::default(),
            AbsoluteDistance::default(),
            scale,
            None,
        )
        .map_err(fail)?;
    let approx =
        make_fix_delta(&make_zCDP_to_approxDP(gaussian).map_err(fail)?, delta).map_err(fail)?;
    let (epsilon, _) = approx.map(&1).map_err(fail)?;
    Ok(epsilon)
}

/// The zCDP of `numbers` numbers per cell over `cells` cells, each the sum
/// of `nodes` discrete Gaussians of scale `sigma` per unit of sensitivity
/// (Kairouz, Liu & Steinke 2021, Theorem 14).
fn rho_of(sigma: f64, nodes: usize, numbers: usize, cells: usize) -> f64 {
    let n = nodes as f64;
    let d = cells as f64;
    let tau: f64 = 10.0
        * (1..nodes)
            .map(|k| {
                let k = k as f64;
                (-2.0 * std::f64::consts::PI.powi(2) * sigma * sigma * k / (k + 1.0)).exp()
            })
            .sum::<f64>();
    let eps = (1.0 / (n * sigma * sigma) + tau * d / 2.0)
        .sqrt()
        .min(1.0 / (n.sqrt() * sigma) + tau * d);
    numbers as f64 * eps * eps / 2.0
}

/// Calibrations already worked out, by epsilon, delta, numbers per cell,
/// cells and nodes: every node and the coordinator calibrate each query,
/// and a query is asked again and again.
type Memo = HashMap<(u64, u64, usize, usize, usize, bool), Calibration>;

fn memo() -> &'static std::sync::Mutex<Memo> {
    static MEMO: std::sync::OnceLock<std::sync::Mutex<Memo>> = std::sync::OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// The smallest noise that gives `layout`'s table, summed over `nodes`
/// nodes, the query's `(epsilon, delta)`.
pub fn calibrate(noise: &Noise, layout: &Layout, nodes: usize) -> Result<Calibration, Error> {
    let key = (
        noise.epsilon.to_bits(),
        noise.delta.to_bits(),
        layout.per_cell(),
        layout.keys.len(),
        nodes,
        layout.linked(),
    );
    if let Some(c) = memo().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let calibration = search(noise, layout, nodes)?;
    let mut memo = memo().lock().unwrap_or_else(|e| e.into_inner());
    if memo.len() >= 4096 {
        memo.clear();
    }
    memo.insert(key, calibration.clone());
    Ok(calibration)
}

/// [`calibrate`]'s search: the classical conversion (`epsilon = rho + 2
/// sqrt(rho ln(1/delta))`, looser than OpenDP's) brackets the scale from
/// above, and bisection narrows it to a part in a million.
fn search(noise: &Noise, layout: &Layout, nodes: usize) -> Result<Calibration, Error> {
    let unreachable = || Error::Unreachable {
        epsilon: noise.epsilon,
        delta: noise.delta,
        nodes,
    };
    if nodes == 0 || noise.delta <= 0.0 || noise.epsilon <= 0.0 {
        return Err(unreachable());
    }
    let numbers = layout.numbers();
    let meets = |sigma: f64| -> Result<bool, Error> {
        Ok(epsilon_of(layout.rho(sigma, nodes), noise.delta)? <= noise.epsilon)
    };
    // Theorem 14 holds from a share's scale of 1/2 up. The classical
    // conversion's rho, spent as `numbers / (2 n sigma^2)`, gives a scale
    // that meets the target but for tau; doubled until it meets it.
    let log = (1.0 / noise.delta).ln();
    let rho = ((log + noise.epsilon).sqrt() - log.sqrt()).powi(2);
    let classical = (numbers as f64 / (2.0 * rho * nodes as f64)).sqrt();
    let (mut lo, mut hi) = (0.5, classical.max(0.5));
    while !meets(hi)? {
        lo = hi;
        hi *= 2.0;
        if hi > 1e9 {
            return Err(unreachable());
        }
    }
    if hi > 0.5 && lo == 0.5 {
        lo = (hi / 4.0).max(0.5);
    }
    if lo < hi && meets(lo)? {
        (lo, hi) = (0.5, lo);
    }
    while hi - lo > hi * 1e-6 {
        let mid = (lo + hi) / 2.0;
        if meets(mid)? { hi = mid } else { lo = mid }
    }
    let per_node = hi;
    let rho = layout.rho(per_node, nodes);
    // Colluders subtract their shares: one discrete Gaussian of the share's
    // scale per number, rho = numbers / (2 sigma^2) (Canonne et al.).
    // Counting each patient once, any one hospital holds the link key and,
    // with the coordinator, reads any known resident's slots: no share of
    // noise protects that.
    let collusion_epsilon = if layout.linked() {
        f64::INFINITY
    } else {
        epsilon_of(numbers as f64 / (2.0 * per_node * per_node), noise.delta)?
    };
    Ok(Calibration {
        epsilon: noise.epsilon,
        delta: noise.delta,
        nodes,
        per_node,
        total: per_node * (nodes as f64).sqrt(),
        rho,
        collusion_epsilon,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghx_study::query::Mechanism;

    fn spec(json: &str) -> QuerySpec {
        QuerySpec::parse(json.as_bytes()).unwrap()
    }

    fn gaussian(epsilon: f64) -> Noise {
        Noise {
            mechanism: Mechanism::Gaussian,
            epsilon,
            delta: 1e-6,
        }
    }

    #[test]
    fn the_layout_follows_the_full_table_and_encodes_and_decodes_exactly() {
        let spec = spec(
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","sex":["female","male"]},
                "analysis":{"kind":"summary","variable":{"kind":"age"},"group_by":["sex"],"clip":{"min":0,"max":120}},
                "release":"pooled"}"#,
        );
        let layout = Layout::of(&spec);
        assert_eq!(
            layout.keys,
            [vec!["female".to_owned()], vec!["male".to_owned()]]
        );
        // Exact: n, sum, sum of squares and those without a value.
        assert_eq!(layout.dim(), 8);
        let cells = |values: &[f64]| RawCell {
            key: vec!["male".into()],
            value: Raw::Values(values.to_vec()),
        };
        let a = layout.encode(&[cells(&[40.5, 60.25])]).unwrap();
        let b = layout.encode(&[cells(&[50.0])]).unwrap();
        let sum: Vec<i64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let Candidate::Summary(m, lacking) = &layout.decode(&sum).unwrap()[1] else {
            panic!()
        };
        let pooled = Moments::of(&[40.5, 60.25, 50.0]);
        assert_eq!((m.n, lacking), (3, &Some(0)));
        assert!((m.mean - pooled.mean).abs() < 1e-9 && (m.m2 - pooled.m2).abs() < 1e-6);
        // A cell of another table is refused by name.
        let stray = RawCell {
            key: vec!["robot".into()],
            value: Raw::Values(vec![]),
        };
        assert_eq!(
            layout.encode(&[stray]),
            Err(Error::UnknownCell("robot".into()))
        );
        assert!(matches!(layout.decode(&[0; 3]), Err(Error::Length { .. })));
    }

    #[test]
    fn calibration_meets_the_asked_epsilon_and_collusion_costs_more() {
        let count = Layout::of(&spec(
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex"]},"release":"pooled"}"#,
        ));
        let c = calibrate(&gaussian(1.0), &count, 3).unwrap();
        assert!(epsilon_of(c.rho, 1e-6).unwrap() <= 1.0);
        // Tight: 1% less noise would not meet it.
        assert!(epsilon_of(rho_of(c.per_node * 0.99, 3, 1, 4), 1e-6).unwrap() > 1.0);
        // Close to the central discrete Gaussian for one number: sigma about
        // 4.5 at epsilon 1, delta 1e-6 (zCDP conversion).
        assert!((4.0..5.5).contains(&c.total), "{c:?}");
        assert!(
            c.collusion_epsilon > 1.5 && c.collusion_epsilon < 3.0,
            "{c:?}"
        );
        // More numbers per cell take more noise for the same epsilon.
        let rate = Layout::of(&spec(
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"rate","event":{"conditions":[{"system":"http://hl7.org/fhir/sid/icd-10","code":"E11"}]}},"release":"pooled"}"#,
        ));
        assert!(calibrate(&gaussian(1.0), &rate, 3).unwrap().total > c.total * 1.3);
    }

    #[test]
    fn the_shares_sum_to_the_calibrated_spread() {
        let layout = Layout::of(&spec(
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":0,"width":1,"count":198}},"release":"pooled"}"#,
        ));
        let c = calibrate(&gaussian(0.5), &layout, 3).unwrap();
        // 2,000 sums of three shares: the variance within 10% (its own
        // relative error is about 3%).
        let sums: Vec<f64> = (0..10)
            .flat_map(|_| {
                let shares: Vec<Vec<i64>> = (0..3).map(|_| layout.noise(&c).unwrap()).collect();
                (0..layout.dim())
                    .map(|i| shares.iter().map(|s| s[i]).sum::<i64>() as f64)
                    .collect::<Vec<_>>()
            })
            .collect();
        let n = sums.len() as f64;
        let mean = sums.iter().sum::<f64>() / n;
        let var = sums.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let expected = c.total * c.total;
        assert!(mean.abs() < 4.0 * c.total / n.sqrt(), "{mean}");
        assert!((var / expected - 1.0).abs() < 0.1, "{var} vs {expected}");
    }

    #[test]
    fn linked_bitmaps_carry_the_noise_and_no_bitmap_lies_over_another() {
        use crate::linkage::{LinkKey, QueryKey};
        let spec = spec(
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","sex":["female"]},"analysis":{"kind":"rate","event":{"conditions":[{"system":"http://hl7.org/fhir/sid/icd-10","code":"E11"}]}},"release":"pooled","each_patient_once":true,"linkage_slots":4096}"#,
        );
        let layout = Layout::of(&spec);
        let link = LinkKey::parse(&"ab".repeat(32)).unwrap();
        let tokens: Vec<String> = (0..600).map(|i| link.token(&format!("{i:013}"))).collect();
        let calibration = calibrate(&gaussian(1.0), &layout, 3).unwrap();
        layout.check_load(&calibration).unwrap();
        let key = layout.keys[0].clone();
        let (mut errors, mut overlaps) = (Vec::new(), Vec::new());
        for run in 0..40 {
            let q = QueryKey::derive(&link, "s", &format!("jti-{run}"), "q");
            // Three hospitals; the first 300 residents have the event, and
            // hospital h holds residents with i % 3 != h or i < 100.
            let mut sum = vec![0i64; layout.dim()];
            for h in 0..3 {
                let held: Vec<usize> = (0..600).filter(|i| i % 3 != h || *i < 100).collect();
                let place = |j: usize, who: &mut dyn Iterator<Item = &usize>| -> Vec<u64> {
                    let bitmap = layout.bitmap(&key, j).unwrap();
                    who.map(|i| q.linked(&tokens[*i], bitmap)).collect()
                };
                let cell = LinkedCell {
                    key: key.clone(),
                    counts: vec![
                        place(0, &mut held.iter().filter(|i| **i < 300)),
                        place(1, &mut held.iter()),
                    ],
                };
                let mut v = layout.encode_linked(&[cell], 0).unwrap();
                for (x, e) in v.iter_mut().zip(layout.noise(&calibration).unwrap()) {
                    *x = x.wrapping_add(e);
                }
                for (s, x) in sum.iter_mut().zip(v) {
                    *s = s.wrapping_add(x);
                }
            }
            let (cells, _) = layout.decode_linked(&sum, Some(&calibration)).unwrap();
            let Candidate::Rate(r) = &cells[0] else {
                panic!()
            };
            errors.push(r.population as f64 - 600.0);
            // The events' occupied slots against the population's: chance
            // only (a patient is placed anew in each bitmap).
            let m = 4096;
            let (e, p) = (&sum[..m], &sum[m..2 * m]);
            let both = e
                .iter()
                .zip(p)
                .filter(|(a, b)| **a != 0 && **b != 0)
                .count() as f64;
            let chance = e.iter().filter(|a| **a != 0).count() as f64
                * p.iter().filter(|b| **b != 0).count() as f64
                / m as f64;
            overlaps.push(both - chance);
        }
        let n = errors.len() as f64;
        let mean = errors.iter().sum::<f64>() / n;
        let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n).sqrt();
        // The spread is the calibrated noise with linear counting's error
        // over the residents and the phantoms; the mean is unbiased.
        let load = 600.0 + 3.0 * phantom_shift(&calibration) as f64;
        let expected =
            (calibration.total.powi(2) + crate::linkage::standard_error(load, 4096).powi(2)).sqrt();
        assert!(mean.abs() < 4.0 * expected / n.sqrt() + 1.0, "{mean}");
        assert!(
            sd > 0.6 * expected && sd < 1.5 * expected,
            "{sd} vs {expected}"
        );
        let overlap = overlaps.iter().sum::<f64>() / n;
        assert!(
            overlap.abs() < 15.0,
            "events lie over the population: {overlap}"
        );
        // Too little epsilon for the slots: refused before anyone pays.
        let tight = calibrate(&gaussian(0.05), &layout, 3).unwrap();
        assert!(matches!(
            layout.check_load(&tight),
            Err(Error::PhantomLoad { .. })
        ));
    }
}
