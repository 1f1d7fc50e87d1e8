//! The NCCL-backed communicator. Without the `cuda` feature, without a GPU or without libnccl,
//! starting one is a clear error and the test says what it skipped. With a GPU (NCCL refuses two
//! ranks on one GPU, so one GPU runs one rank): a single-rank communicator exchanges uneven buffers
//! with itself through the all-to-all-v scheduler, bit for bit, and an aborted one fails at once.

use semoe::kernels::cuda::CudaDevice;
use semoe::net::collective::alltoallv::AllToAllV;
use semoe::net::collective::{nccl_unique_id, Collective, Group, NcclCollective};
use std::time::{Duration, Instant};

#[test]
fn a_single_rank_nccl_communicator_exchanges_with_itself() {
    let deadline = Duration::from_secs(20);
    let id = match nccl_unique_id() {
        Ok(id) => id,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cuda") && (msg.contains("NCCL") || msg.contains("without CUDA")),
                "{msg}"
            );
            eprintln!("skipping the NCCL test: {msg}");
            return;
        }
    };
    if CudaDevice::count() == 0 {
        let err = NcclCollective::new(0, 0, 1, 0, id, deadline)
            .expect_err("no GPU is visible")
            .to_string();
        // No GPU: none counted, or the driver's own reason (no device, a missing library).
        assert!(
            err.contains("GPU 0") && (err.contains("0 GPU(s) visible") || err.contains("CUDA driver")),
            "{err}"
        );
        eprintln!("skipping the NCCL test: no CUDA GPU is visible ({err})");
        return;
    }

    let mut comm = NcclCollective::new(0, 0, 1, 0, id, deadline).expect("a single-rank communicator on GPU 0");
    assert_eq!((comm.rank(), comm.world(), comm.epoch()), (0, 1, 0));
    assert_eq!(comm.all_to_all_counts(&[12345]).expect("counts"), vec![12345]);
    let scheduler = AllToAllV::new(1 << 24);
    for len in [0usize, 1, 7, 4096, 1_000_003] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let got = scheduler
            .exchange(&mut comm, vec![data.clone()])
            .expect("a self-exchange");
        assert_eq!(got, vec![data], "{len} bytes");
    }
    let floats: Vec<f32> = (0..1000).map(|i| (i as f32).sin() * 1e-3 + f32::EPSILON).collect();
    let got = scheduler.exchange_f32(&mut comm, vec![floats.clone()]).expect("f32");
    assert_eq!(got.len(), 1, "one buffer from the one rank");
    assert_eq!(got[0].len(), floats.len());
    assert!(got[0].iter().zip(&floats).all(|(a, b)| a.to_bits() == b.to_bits()));

    // An abort fails the next collective at once and names it.
    comm.abort_handle().abort("a test asked for it");
    let start = Instant::now();
    let err = comm.group(Group::new()).expect_err("aborted").to_string();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        err.contains("on rank 0") && err.contains("a test asked for it"),
        "{err}"
    );
}
