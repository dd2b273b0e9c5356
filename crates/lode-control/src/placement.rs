//! Where a start goes: a worker that has the image warm first, else consistent hashing of
//! the image over the workers with bounded load, so each image's starts concentrate on
//! the workers whose caches hold its chunks.
//!
//! The rule, in order:
//!
//! 1. **Warm.** Among the live workers whose cache holds the image and whose load is under
//!    both their capacity and the load bound below, the least loaded. Ties go to the
//!    worker with the lowest score `fmix64(worker seed ^ image point)`, a per-image
//!    shuffle, so equal warm workers share an image's starts evenly across images and the
//!    order of the worker list never decides.
//! 2. **Hashed** (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam,
//!    2018). Each worker sits at [`POINTS_PER_WORKER`] points on a 64-bit ring, each point
//!    the first 8 bytes of a SHA-256 of the worker's id and the point's number; the
//!    image's point is the first 8 bytes of a SHA-256 of its manifest id. From the image's
//!    point, walk clockwise to the first live worker whose load is under
//!    `min(capacity, ceil((1 + epsilon) * (total load + 1) / live workers))`, the total
//!    over live workers. Without loads this is plain consistent hashing: an image always
//!    lands on the same worker, and adding or removing a worker moves only the images
//!    whose point falls on that worker's arcs, about 1/n of them.
//! 3. When full workers hold more than their share, the bound can exclude every live
//!    worker that has room; then the least loaded worker with room, the first met on the
//!    walk. `None` only when no live worker has room.
//!
//! A placement is deterministic in the worker ids, the loads, the image and epsilon; it
//! does not depend on the order of the worker list (barring a 64-bit hash collision), so
//! control replicas that list the same workers differently still agree. A call allocates
//! nothing: two passes over `loads` (O(n)), a binary search of the ring (O(log nV)) and a
//! walk that, while some worker is under the bound, ends after a few points on average.

use ring::digest::{Context, SHA256};

/// How many points each worker has on the ring. With V points a worker's share of the
/// ring has a relative spread of about 1/sqrt(V); 128 keeps the busiest of 100 workers
/// within about a third of the mean before bounded load evens out the rest, and the
/// ring of 100 workers is 12,800 points (200 KiB), built in a few milliseconds.
pub const POINTS_PER_WORKER: u32 = 128;

/// Domain separation, so a ring point never equals the hash of anything else lode hashes.
const POINT_DOMAIN: &[u8] = b"lode placement point\0";
const SEED_DOMAIN: &[u8] = b"lode placement worker\0";
const IMAGE_DOMAIN: &[u8] = b"lode placement image\0";

/// The workers, in a fixed order, hashed onto a ring.
#[derive(Clone, Debug)]
pub struct Ring {
    workers: Vec<String>,
    /// Every worker's points, sorted by position (then worker index, for the equal
    /// positions a collision would give).
    points: Vec<Point>,
    /// Per worker, the seed of its warm tie-break score.
    seeds: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    at: u64,
    worker: usize,
}

/// The first 8 bytes of the SHA-256 of `parts`, big-endian.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// MurmurHash3's 64-bit finaliser: a bijection mixing every input bit into every output
/// bit, so one worker's tie-break scores are unrelated across images.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

impl Ring {
    /// A ring of these workers (ids).
    pub fn new(workers: impl IntoIterator<Item = String>) -> Ring {
        let workers: Vec<String> = workers.into_iter().collect();
        let mut points = Vec::with_capacity(workers.len() * POINTS_PER_WORKER as usize);
        let mut seeds = Vec::with_capacity(workers.len());
        for (worker, id) in workers.iter().enumerate() {
            // The id sits between a fixed prefix and a fixed-width suffix, so no two
            // (id, number) pairs hash the same input.
            for n in 0..POINTS_PER_WORKER {
                let at = hash64(&[POINT_DOMAIN, id.as_bytes(), &n.to_le_bytes()]);
                points.push(Point { at, worker });
            }
            seeds.push(hash64(&[SEED_DOMAIN, id.as_bytes()]));
        }
        points.sort_unstable();
        Ring {
            workers,
            points,
            seeds,
        }
    }

    /// The workers, in the order [`place`]'s `loads` and answer use.
    pub fn workers(&self) -> &[String] {
        &self.workers
    }

    /// The share of the ring's circumference each worker's arcs cover (the share of
    /// images plain consistent hashing sends it), indexed like [`Ring::workers`].
    pub fn shares(&self) -> Vec<f64> {
        let mut shares = vec![0.0; self.workers.len()];
        let Some(last) = self.points.last() else {
            return shares;
        };
        // A point owns the arc from the point before it (exclusive) up to itself: the
        // images whose walk starts there meet it first.
        let mut prev = last.at;
        for p in &self.points {
            let arc = p.at.wrapping_sub(prev);
            shares[p.worker] += arc as f64 / 2f64.powi(64);
            prev = p.at;
        }
        shares
    }
}

/// A worker's state when a start is placed, indexed like [`Ring::workers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// How many images it may have attached at once.
    pub capacity: u32,
    /// How many it has assigned now.
    pub load: u32,
    /// Whether its cache holds the image.
    pub warm: bool,
    /// Whether it heartbeated lately.
    pub alive: bool,
}

impl Load {
    fn has_room(&self) -> bool {
        self.alive && self.load < self.capacity
    }
}

/// Where a start goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The index of the worker in [`Ring::workers`].
    pub worker: usize,
    /// How it was chosen.
    pub how: crate::api::Placed,
}

/// The most assignments a worker may hold for hashing to pick it:
/// `ceil((1 + epsilon) * (total + 1) / live)`. A negative or non-finite `epsilon` counts
/// as 0; the answer saturates rather than overflows.
pub fn load_bound(total: u64, live: u64, epsilon: f64) -> u64 {
    if live == 0 {
        return 0;
    }
    let epsilon = if epsilon.is_finite() && epsilon > 0.0 {
        epsilon
    } else {
        0.0
    };
    let bound = ((1.0 + epsilon) * (total as f64 + 1.0) / live as f64).ceil();
    if bound >= u64::MAX as f64 {
        u64::MAX
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "finite, at least 1 and below u64::MAX: the cast is exact"
        )]
        let bound = bound as u64;
        bound
    }
}

/// Places a start of `image` (its manifest id) on one of the ring's workers, or `None`
/// when no live worker has room. `epsilon` bounds load: no worker takes more than
/// `ceil((1 + epsilon) * (total load + 1) / live workers)` by hashing.
///
/// `loads` is indexed like [`Ring::workers`]; a worker without an entry counts as dead.
pub fn place(ring: &Ring, image: &[u8; 32], loads: &[Load], epsilon: f64) -> Option<Placement> {
    let loads = &loads[..loads.len().min(ring.workers.len())];
    let (mut live, mut total, mut room) = (0u64, 0u64, false);
    for l in loads.iter().filter(|l| l.alive) {
        live += 1;
        total += u64::from(l.load);
        room |= l.has_room();
    }
    if !room {
        return None;
    }
    let bound = load_bound(total, live, epsilon);
    let under = |l: &Load| l.has_room() && u64::from(l.load) < bound;
    let key = hash64(&[IMAGE_DOMAIN, image]);

    let warm = loads
        .iter()
        .enumerate()
        .filter(|(_, l)| l.warm && under(l))
        .min_by_key(|&(i, l)| (l.load, fmix64(ring.seeds[i] ^ key), i));
    if let Some((worker, _)) = warm {
        return Some(Placement {
            worker,
            how: crate::api::Placed::Warm,
        });
    }

    let start = ring.points.partition_point(|p| p.at < key);
    let (before, after) = ring.points.split_at(start);
    let mut least: Option<(u32, usize)> = None;
    for p in after.iter().chain(before) {
        let Some(l) = loads.get(p.worker).filter(|l| l.has_room()) else {
            continue;
        };
        if under(l) {
            return Some(Placement {
                worker: p.worker,
                how: crate::api::Placed::Hashed,
            });
        }
        if least.is_none_or(|(load, _)| l.load < load) {
            least = Some((l.load, p.worker));
        }
    }
    least.map(|(_, worker)| Placement {
        worker,
        how: crate::api::Placed::Hashed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_rounds_up_and_saturates() {
        assert_eq!(load_bound(0, 4, 0.25), 1);
        assert_eq!(load_bound(7, 4, 0.0), 2);
        assert_eq!(load_bound(8, 4, 0.0), 3);
        assert_eq!(load_bound(11, 4, 0.25), 4);
        assert_eq!(load_bound(3, 4, f64::NAN), 1);
        assert_eq!(load_bound(3, 4, -5.0), 1);
        assert_eq!(load_bound(3, 4, f64::INFINITY), 1);
        assert_eq!(load_bound(u64::MAX, 1, 1e300), u64::MAX);
        assert_eq!(load_bound(5, 0, 0.25), 0);
    }

    #[test]
    fn shares_cover_the_ring() {
        for n in [1, 2, 7] {
            let ring = Ring::new((0..n).map(|i| format!("w{i}")));
            let sum: f64 = ring.shares().iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{n} workers: shares sum to {sum}");
        }
        assert!(Ring::new(Vec::new()).shares().is_empty());
    }

    #[test]
    fn an_empty_ring_places_nothing() {
        assert_eq!(place(&Ring::new(Vec::new()), &[0; 32], &[], 0.25), None);
    }
}
