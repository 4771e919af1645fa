//! The fuzz targets' checks (`fuzz/src/checks.rs`) on stable Rust, without cargo-fuzz: every
//! committed seed in `fuzz/corpus/<target>/`, then thousands of deterministic mutations of the
//! seeds and random inputs, then hand-picked edge cases at the size limits. Takes well under a
//! second in release; the long runs with libFuzzer are described in docs/FUZZING.md.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
};

use tftp_backend::wire::MAX_PACKET;

/// Mutated inputs per target (plus as many purely random ones / 8).
const MUTATIONS: usize = 50_000;

/// Tokens the mutator splices in: the words the parsers look for.
const DICTIONARY: &[&[u8]] = &[
    b"\0",
    b"octet\0",
    b"netascii\0",
    b"blksize\0",
    b"tsize\0",
    b"timeout\0",
    b"windowsize\0",
    b"65464\0",
    b"4294967296\0",
    b"18446744073709551616\0",
    b"+1\0",
    b"XLB\x01",
    b"\xff\xff\xff\xff",
    b"\xc3\x28",
];

/// SplitMix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// One to four random edits of `input`, some of them borrowing from `other` seeds.
fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = *[0, 0xff, b'0', b'9', 0x7f, 0x80, 1, 2].get(rng.below(8)).unwrap();
            }
            2 => {
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.byte()).collect();
                out.splice(at..at, bytes);
            }
            3 => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            4 => out.truncate(at),
            5 => {
                let token = DICTIONARY[rng.below(DICTIONARY.len())];
                out.splice(at..at, token.iter().copied());
            }
            6 => {
                // Splice: our front, another seed's back.
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                let end = (at + rng.below(32)).min(out.len());
                let chunk = out[at..end].to_vec();
                out.splice(at..at, chunk);
            }
        }
    }
    out
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{}: the committed seed corpus is missing", dir.display());
    files.iter().map(|path| fs::read(path).unwrap()).collect()
}

/// Runs `check` on `input`; on a panic, saves the input (replay it with
/// `cargo fuzz run <target> <file>`, or add it to the corpus) and fails naming the file.
fn run(target: &str, check: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        let name = format!("crash-{target}-{:016x}", input.iter().fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b)));
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        fs::write(&path, input).unwrap();
        let hex: String = input.iter().take(64).fold(String::new(), |hex, b| hex + &format!("{b:02x}"));
        panic!("fuzz check `{target}` failed on a {}-byte input {hex}..., saved as {}", input.len(), path.display());
    }
}

fn replay(target: &str, check: fn(&[u8]), seed: u64) {
    let seeds = corpus(target);
    for input in &seeds {
        run(target, check, input);
    }
    let mut rng = Rng(seed);
    for i in 0..MUTATIONS {
        let input = mutate(&mut rng, &seeds[i % seeds.len()], &seeds);
        run(target, check, &input);
        if i % 8 == 0 {
            let random: Vec<u8> = (0..rng.below(200)).map(|_| rng.byte()).collect();
            run(target, check, &random);
        }
    }
}

#[test]
fn wire_corpus_and_mutations() {
    replay("wire", checks::wire, 0x7766_6972_6531);
}

#[test]
fn steering_corpus_and_mutations() {
    replay("steering", checks::steering, 0x7374_6565_7231);
}

#[test]
fn options_corpus_and_mutations() {
    replay("options", checks::options, 0x6f70_7469_6f6e);
}

/// Inputs at the parser's size limit, which libFuzzer's default `-max_len` never reaches.
#[test]
fn wire_edge_cases_at_the_size_limit() {
    let packet = |opcode: u8, fill: u8, len: usize| {
        let mut p = vec![0, opcode, 0, 1];
        p.resize(len, fill);
        p
    };
    for len in [MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 1] {
        // DATA of the largest block, ERROR without its NUL, requests and OACK without any.
        for (opcode, fill) in [(3, b'd'), (5, b'e'), (1, b'r'), (2, b'w'), (6, b'o'), (4, b'a')] {
            run("wire", checks::wire, &packet(opcode, fill, len));
        }
        // A request whose terminators sit at the very end.
        let mut rrq = packet(1, b'f', len);
        let n = rrq.len();
        rrq[n - 7..].copy_from_slice(b"\0octet\0");
        run("wire", checks::wire, &rrq);
        run("steering", checks::steering, &[vec![0; 64], rrq].concat());
    }
}
