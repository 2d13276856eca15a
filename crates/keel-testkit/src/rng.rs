//! A small seeded random number generator (SplitMix64) and a hash of several numbers
//! into one draw: the simulation's only source of randomness, so that a seed means the
//! same workload and the same fault schedule on every machine and every version of
//! the dependencies.

/// SplitMix64's finalizer: a good 64-bit mix of one number.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic hash of `values`: the same numbers give the same result everywhere.
pub fn hash(values: &[u64]) -> u64 {
    values.iter().fold(0x243f_6a88_85a3_08d3, |state, value| mix64(state ^ mix64(*value)))
}

/// A draw in `[0, 1)` from the numbers that name it (seed, stream, call, purpose).
pub fn unit(values: &[u64]) -> f64 {
    (hash(values) >> 11) as f64 / (1u64 << 53) as f64
}

/// A SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: hash(&[seed]) }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A number in `low..high` (`low` when the range is empty).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }

    /// A generator of its own for a part of the work (`stream`), so that drawing more
    /// for one part does not shift what another part draws.
    pub fn fork(&self, stream: u64) -> Rng {
        Rng { state: hash(&[self.state, stream]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_numbers() {
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            (0..5).map(|_| rng.range(0, 1000)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        assert!(draws(7).iter().all(|draw| *draw < 1000));
    }

    #[test]
    fn unit_draws_stay_in_range_and_spread() {
        let draws: Vec<f64> = (0..1000).map(|n| unit(&[1, n])).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        let below_half = draws.iter().filter(|draw| **draw < 0.5).count();
        assert!((400..600).contains(&below_half), "{below_half} of 1000 below one half");
    }
}
