//! Where a start goes: a worker that has the image warm first, else consistent hashing of
//! the image over the workers with bounded load, so each image's starts concentrate on
//! the workers whose caches hold its chunks.
//!
//! The interface is fixed; the placement below is the interim rule (the first live worker
//! with room) until the hashing lands.

/// The workers, in a fixed order, hashed onto a ring.
#[derive(Clone, Debug)]
pub struct Ring {
    workers: Vec<String>,
}

impl Ring {
    /// A ring of these workers (ids).
    pub fn new(workers: impl IntoIterator<Item = String>) -> Ring {
        Ring {
            workers: workers.into_iter().collect(),
        }
    }

    /// The workers, in the order [`place`]'s `loads` and answer use.
    pub fn workers(&self) -> &[String] {
        &self.workers
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

/// Where a start goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The index of the worker in [`Ring::workers`].
    pub worker: usize,
    /// How it was chosen.
    pub how: crate::api::Placed,
}

/// Places a start of `image` (its manifest id) on one of the ring's workers, or `None`
/// when no live worker has room. `epsilon` bounds load: no worker takes more than
/// `ceil((1 + epsilon) * (total load + 1) / live workers)` by hashing.
pub fn place(ring: &Ring, image: &[u8; 32], loads: &[Load], epsilon: f64) -> Option<Placement> {
    let _ = (image, epsilon);
    ring.workers()
        .iter()
        .enumerate()
        .find(|(i, _)| {
            loads
                .get(*i)
                .is_some_and(|l| l.alive && l.load < l.capacity)
        })
        .map(|(worker, _)| Placement {
            worker,
            how: crate::api::Placed::Hashed,
        })
}
