//! Parity with the Python reference: Pillow's resize, SegformerImageProcessor's pixels, transformers' logits and the
//! upsampled argmax masks, on fixtures made by scripts/make_model_fixtures.py and scripts/make_resize_fixtures.py.

mod common;

use common::{Npy, fixtures};
use segq::model::{self, ModelSource};
use segq::preprocess::{self, Protocol};
use segq::segmenter::{ModelInput, Segmenter, forward_inputs};

const MODELS: [&str; 3] = ["tiny_a", "tiny_b_bin", "tiny_c"];
const IMAGES: [&str; 3] = ["odd_37x53", "wide_101x45", "small_23x19"];

#[test]
fn pillow_resize_is_bit_exact() {
    let dir = fixtures().join("resize");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().expect("a list of cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let input = image::open(dir.join(case["input"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (w, h) = (
            case["out_w"].as_u64().unwrap() as usize,
            case["out_h"].as_u64().unwrap() as usize,
        );
        let expected = Npy::read(&dir.join(case["file"].as_str().unwrap()));
        assert_eq!(expected.shape, vec![h, w, 3]);
        let ours = preprocess::resize_bilinear_pillow(&input, w, h);
        let diff = ours.as_raw().iter().zip(&expected.data).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{case}: {diff} bytes differ from Pillow");
    }
}

#[test]
fn jpeg_decoding_matches_pillow() {
    let img = segq::data::decode::read_rgb(&fixtures().join("images/photo_61x47.jpg")).unwrap();
    let expected = Npy::read(&fixtures().join("images/photo_61x47.decoded.npy"));
    assert_eq!(expected.shape, vec![47, 61, 3]);
    assert_eq!(img.as_raw(), &expected.data, "decoded JPEG differs from Pillow");
}

#[test]
fn logits_match_transformers() {
    let mut pixel_faults = Vec::new();
    for m in MODELS {
        let loaded = model::load(&ModelSource::Local(fixtures().join("models").join(m))).unwrap();
        for stem in IMAGES {
            let image = segq::data::decode::read_rgb(&fixtures().join(format!("images/{stem}.png"))).unwrap();
            let reference = fixtures().join("reference");
            let expected_pixels = Npy::read(&reference.join(format!("{m}__{stem}.pixel_values.npy")));
            let pixels = preprocess::preprocess(&image, &loaded.preprocessor, Protocol::Transformers);
            let reference_pixels = expected_pixels.f32s();
            assert_eq!(pixels.len(), reference_pixels.len(), "{m}/{stem}: pixel count");
            let max_pix = pixels
                .iter()
                .zip(&reference_pixels)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if max_pix > 1e-6 {
                pixel_faults.push(format!("{m}/{stem}: pixel values differ by {max_pix}"));
            }

            // The model is checked on the reference's own pixels, so a preprocessing fault cannot hide in it.
            let input = ModelInput {
                pixels: reference_pixels,
                height: expected_pixels.shape[1],
                width: expected_pixels.shape[2],
            };
            let logits = forward_inputs(&loaded.model, &[&input]).unwrap().remove(0).logits;
            let expected = Npy::read(&reference.join(format!("{m}__{stem}.logits.npy")));
            assert_eq!(
                [logits.classes, logits.height, logits.width][..],
                expected.shape[..],
                "{m}/{stem}: logits shape"
            );
            let exp = expected.f32s();
            let max_ref = exp.iter().map(|v| v.abs()).fold(0f32, f32::max);
            let max_diff = logits
                .data
                .iter()
                .zip(&exp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_diff <= 1e-4 * max_ref,
                "{m}/{stem}: max |segq - transformers| = {max_diff}, bound {}",
                1e-4 * max_ref
            );

            let expected_mask = Npy::read(&reference.join(format!("{m}__{stem}.mask.npy")));
            let mask = logits.mask(image.height() as usize, image.width() as usize);
            let exp_mask = expected_mask.ints();
            let differing = mask.iter().zip(&exp_mask).filter(|(a, b)| **a as i64 != **b).count();
            // Float noise can flip an exact near-tie; allow at most 0.5% of pixels.
            assert!(
                differing * 200 <= mask.len(),
                "{m}/{stem}: {differing} of {} mask pixels differ",
                mask.len()
            );
        }
    }
    assert!(
        pixel_faults.is_empty(),
        "preprocessing differs from SegformerImageProcessor: {pixel_faults:?}"
    );
}

/// The embedded demo model on a demo JPEG through the library's `Segmenter` (decode, preprocess, forward) against
/// transformers' logits.
#[test]
fn embedded_demo_model_matches_transformers() {
    let segmenter = Segmenter::from_loaded(model::load(&ModelSource::Embedded).unwrap(), Protocol::Transformers);
    let jpg = common::repo_root().join("assets/demo/ade/ADEChallengeData2016/images/validation/SYN_val_00000001.jpg");
    let image = segq::data::decode::read_rgb(&jpg).unwrap();
    let prediction = segmenter.predict(&image).unwrap();
    let logits = prediction.logits.data;
    let expected = Npy::read(&fixtures().join("demo/SYN_val_00000001.logits.npy"));
    assert_eq!(expected.shape, vec![20, 64, 64]);
    assert_eq!(
        [
            prediction.logits.classes,
            prediction.logits.height,
            prediction.logits.width
        ][..],
        expected.shape[..]
    );
    let exp = expected.f32s();
    let max_ref = exp.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let max_diff = logits.iter().zip(&exp).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(
        max_diff <= 1e-4 * max_ref,
        "max diff {max_diff} vs bound {}",
        1e-4 * max_ref
    );
}
