//! The placement rule's properties over arbitrary fleets: never a dead or full worker, the
//! load bound for hashed placements, warm first when allowed, about 1/n of images moved
//! when a worker joins or leaves, and the same answer for the same inputs.

use lode_control::api::Placed;
use lode_control::placement::{Load, Placement, Ring, load_bound, place};
use proptest::prelude::*;

fn ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("worker-{i}.lode.internal"))
        .collect()
}

/// Image ids as the store makes them: SHA-256 of the manifest, here of a counter.
fn image(i: u64) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, &i.to_le_bytes());
    d.as_ref().try_into().unwrap()
}

fn arb_load() -> impl Strategy<Value = Load> {
    (0u32..8, 0u32..10, any::<bool>(), prop::bool::weighted(0.8)).prop_map(
        |(capacity, load, warm, alive)| Load {
            capacity,
            load,
            warm,
            alive,
        },
    )
}

fn arb_fleet() -> impl Strategy<Value = Vec<Load>> {
    prop::collection::vec(arb_load(), 1..24)
}

/// The bound computed here from its definition, not by the library's function.
#[allow(clippy::cast_possible_truncation, reason = "small test loads")]
fn bound_of(loads: &[Load], epsilon: f64) -> u64 {
    let live: Vec<&Load> = loads.iter().filter(|l| l.alive).collect();
    let total: u64 = live.iter().map(|l| u64::from(l.load)).sum();
    let e = if epsilon > 0.0 { epsilon } else { 0.0 };
    ((1.0 + e) * (total as f64 + 1.0) / live.len() as f64).ceil() as u64
}

fn has_room(l: &Load) -> bool {
    l.alive && l.load < l.capacity
}

fn idle(n: usize) -> Vec<Load> {
    vec![
        Load {
            capacity: 100,
            load: 0,
            warm: false,
            alive: true,
        };
        n
    ]
}

proptest! {
    #[test]
    fn never_a_dead_or_full_worker(
        loads in arb_fleet(), img in any::<[u8; 32]>(), epsilon in 0.0f64..2.0
    ) {
        let ring = Ring::new(ids(loads.len()));
        match place(&ring, &img, &loads, epsilon) {
            Some(p) => {
                let l = loads[p.worker];
                prop_assert!(has_room(&l), "placed on {p:?}, which is {l:?}");
            }
            None => prop_assert!(
                !loads.iter().any(has_room),
                "no placement though a live worker has room: {loads:?}"
            ),
        }
    }

    #[test]
    fn hashed_placements_keep_the_load_bound(
        loads in arb_fleet(), img in any::<[u8; 32]>(), epsilon in 0.0f64..2.0
    ) {
        let ring = Ring::new(ids(loads.len()));
        let bound = bound_of(&loads, epsilon);
        if loads.iter().any(|l| l.alive) {
            prop_assert_eq!(
                load_bound(
                    loads.iter().filter(|l| l.alive).map(|l| u64::from(l.load)).sum(),
                    loads.iter().filter(|l| l.alive).count() as u64,
                    epsilon,
                ),
                bound
            );
        }
        let Some(p) = place(&ring, &img, &loads, epsilon) else { return Ok(()) };
        let chosen = u64::from(loads[p.worker].load);
        let someone_under = loads.iter().any(|l| has_room(l) && u64::from(l.load) < bound);
        if someone_under {
            prop_assert!(chosen < bound, "{p:?} has load {chosen}, bound {bound}: {loads:?}");
        } else {
            // The bound excludes every worker with room: the least loaded with room.
            let least = loads.iter().filter(|l| has_room(l)).map(|l| l.load).min().unwrap();
            prop_assert_eq!(p.how, Placed::Hashed);
            prop_assert_eq!(loads[p.worker].load, least);
        }
    }

    #[test]
    fn warm_wins_when_allowed(
        loads in arb_fleet(), img in any::<[u8; 32]>(), epsilon in 0.0f64..2.0
    ) {
        let ring = Ring::new(ids(loads.len()));
        let bound = bound_of(&loads, epsilon);
        let allowed: Vec<u32> = loads
            .iter()
            .filter(|l| l.warm && has_room(l) && u64::from(l.load) < bound)
            .map(|l| l.load)
            .collect();
        let p = place(&ring, &img, &loads, epsilon);
        match allowed.iter().min() {
            Some(&least) => {
                let p = p.expect("a warm worker is allowed, so some worker has room");
                prop_assert_eq!(p.how, Placed::Warm);
                prop_assert!(loads[p.worker].warm);
                prop_assert_eq!(loads[p.worker].load, least);
            }
            None => prop_assert!(p.is_none_or(|p| p.how == Placed::Hashed)),
        }
    }

    #[test]
    fn same_inputs_same_answer_whatever_the_worker_order(
        loads in arb_fleet(),
        img in any::<[u8; 32]>(),
        epsilon in 0.0f64..2.0,
        rotate in 0usize..24,
    ) {
        let names = ids(loads.len());
        let ring = Ring::new(names.clone());
        let first = place(&ring, &img, &loads, epsilon);
        prop_assert_eq!(place(&Ring::new(names.clone()), &img, &loads, epsilon), first);
        prop_assert_eq!(place(&ring, &img, &loads, epsilon), first);

        // Another replica lists the same workers in another order: the same worker wins.
        let k = rotate % loads.len();
        let (mut names2, mut loads2) = (names.clone(), loads.clone());
        names2.rotate_left(k);
        loads2.rotate_left(k);
        names2.reverse();
        loads2.reverse();
        let second = place(&Ring::new(names2.clone()), &img, &loads2, epsilon);
        prop_assert_eq!(
            first.map(|p| (names[p.worker].clone(), p.how)),
            second.map(|p| (names2[p.worker].clone(), p.how))
        );
    }

    #[test]
    fn loads_without_an_entry_count_as_dead(
        loads in arb_fleet(), img in any::<[u8; 32]>(), extra in 1usize..4
    ) {
        let ring = Ring::new(ids(loads.len() + extra));
        if let Some(p) = place(&ring, &img, &loads, 0.25) {
            prop_assert!(p.worker < loads.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A new worker takes only images that hash to its own arcs; nothing else moves.
    #[test]
    fn adding_a_worker_moves_about_one_nth(n in 2usize..40, seed in any::<u64>()) {
        const IMAGES: u64 = 2000;
        let names = ids(n + 1);
        let before = Ring::new(names[..n].iter().cloned());
        let after = Ring::new(names.iter().cloned());
        let mut moved = 0u64;
        for i in 0..IMAGES {
            let img = image(seed.wrapping_add(i));
            let a = place(&before, &img, &idle(n), 0.25).unwrap();
            let b = place(&after, &img, &idle(n + 1), 0.25).unwrap();
            if a.worker != b.worker {
                prop_assert_eq!(b.worker, n, "an image moved between two old workers");
                moved += 1;
            }
        }
        let limit = IMAGES * 2 / (n as u64 + 1) + IMAGES / 50;
        prop_assert!(moved <= limit, "{moved} of {IMAGES} moved to worker {n} of {}", n + 1);
    }

    /// A worker that leaves gives up only its own images; nothing else moves.
    #[test]
    fn removing_a_worker_moves_about_one_nth(
        n in 3usize..40, gone in any::<prop::sample::Index>(), seed in any::<u64>()
    ) {
        const IMAGES: u64 = 2000;
        let names = ids(n);
        let gone = gone.index(n);
        let ring = Ring::new(names.iter().cloned());
        let mut loads = idle(n);
        let mut moved = 0u64;
        for i in 0..IMAGES {
            let img = image(seed.wrapping_add(i));
            loads[gone].alive = true;
            let a = place(&ring, &img, &loads, 0.25).unwrap();
            loads[gone].alive = false;
            let b = place(&ring, &img, &loads, 0.25).unwrap();
            prop_assert_ne!(b.worker, gone);
            if a.worker != b.worker {
                prop_assert_eq!(a.worker, gone, "an image moved between two staying workers");
                moved += 1;
            }
        }
        let limit = IMAGES * 2 / n as u64 + IMAGES / 50;
        prop_assert!(moved <= limit, "{moved} of {IMAGES} moved when one of {n} left");
    }

    /// Filling a fleet one start at a time never takes a worker past the bound of the
    /// moment, so the busiest holds at most ceil((1 + epsilon) * m / n) of m starts.
    #[test]
    fn filling_a_fleet_keeps_every_worker_within_the_bound(
        n in 1usize..30, m in 1u32..400, epsilon in 0.05f64..1.0, seed in any::<u64>()
    ) {
        let ring = Ring::new(ids(n));
        let mut loads = idle(n);
        for l in &mut loads {
            l.capacity = u32::MAX;
        }
        for i in 0..m {
            let Placement { worker, how } =
                place(&ring, &image(seed.wrapping_add(u64::from(i))), &loads, epsilon).unwrap();
            prop_assert_eq!(how, Placed::Hashed);
            loads[worker].load += 1;
        }
        let most = loads.iter().map(|l| l.load).max().unwrap();
        #[allow(clippy::cast_possible_truncation, reason = "at most 2 * 400")]
        let bound = ((1.0 + epsilon) * f64::from(m) / n as f64).ceil() as u32;
        prop_assert!(most <= bound, "busiest {most} of {m} starts over {n}, bound {bound}");
    }
}

/// With all workers idle, the hashing alone spreads images evenly: 100 workers at their
/// ring points, 100,000 images, the busiest within 1.5 times the mean.
#[test]
fn hashing_spreads_images_evenly() {
    const N: usize = 100;
    const IMAGES: u64 = 100_000;
    let ring = Ring::new(ids(N));
    let loads = idle(N);
    let mut count = vec![0u64; N];
    for i in 0..IMAGES {
        count[place(&ring, &image(i), &loads, 0.25).unwrap().worker] += 1;
    }
    let mean = IMAGES / N as u64;
    let (least, most) = (count.iter().min().unwrap(), count.iter().max().unwrap());
    assert!(
        *most <= mean * 3 / 2 && *least >= mean / 2,
        "images per worker from {least} to {most}, mean {mean}"
    );
    let shares = ring.shares();
    let biggest = shares.iter().cloned().fold(0.0, f64::max);
    assert!(
        biggest < 1.5 / N as f64,
        "biggest share of the ring {biggest}"
    );
}

/// When the workers with room are all over the bound (full ones hold the rest), a start
/// still lands: on the least loaded worker with room.
#[test]
fn full_workers_over_their_share_do_not_block_a_start() {
    let ring = Ring::new(ids(2));
    let loads = [
        Load {
            capacity: 0,
            load: 0,
            warm: false,
            alive: true,
        },
        Load {
            capacity: 10,
            load: 5,
            warm: false,
            alive: true,
        },
    ];
    // total 5 over 2 live workers: the bound is ceil(6 / 2) = 3, below worker 1's load.
    assert_eq!(
        place(&ring, &image(0), &loads, 0.0),
        Some(Placement {
            worker: 1,
            how: Placed::Hashed
        })
    );
}
