//! OCI image manifest, image index and descriptor types, parsed strictly enough to trust.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const MEDIA_TYPE_IMAGE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_IMAGE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Docker's manifest list and schema 2 types: accepted by the registry, never produced by us.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Annotation naming a manifest inside an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// Manifests larger than this are refused everywhere (the registry and the agent alike).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Accepted when parsing foreign manifests, never followed: clients fetch `urls` without auth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest document of either kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, over the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("manifest is not valid JSON for {kind}: {source}")]
    Json { kind: &'static str, source: serde_json::Error },
    #[error("manifest has schemaVersion {0}; only 2 is supported")]
    SchemaVersion(u32),
    #[error("manifest media type {0:?} is not an OCI or Docker image manifest or index")]
    UnsupportedMediaType(String),
    #[error("manifest's mediaType field {field:?} disagrees with the Content-Type {content_type:?}")]
    MediaTypeMismatch { field: String, content_type: String },
}

impl Manifest {
    /// Parses a manifest, deciding its kind from the `mediaType` field, else the given content type,
    /// else its shape (`manifests` means an index).
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Json { kind: "a manifest", source })?;
        let content_type = content_type.map(|c| c.split(';').next().unwrap_or(c).trim()).filter(|c| !c.is_empty());
        if let (Some(field), Some(ct)) = (&probe.media_type, content_type)
            && field != ct
        {
            return Err(ManifestError::MediaTypeMismatch { field: field.clone(), content_type: ct.to_owned() });
        }
        let kind = probe.media_type.as_deref().or(content_type);
        let is_index = match kind {
            Some(MEDIA_TYPE_IMAGE_INDEX | MEDIA_TYPE_DOCKER_LIST) => true,
            Some(MEDIA_TYPE_IMAGE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST) => false,
            Some(other) => return Err(ManifestError::UnsupportedMediaType(other.to_owned())),
            None => probe.manifests.is_some(),
        };
        let manifest = if is_index {
            let index: ImageIndex = serde_json::from_slice(bytes)
                .map_err(|source| ManifestError::Json { kind: "an image index", source })?;
            if index.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(index.schema_version));
            }
            Manifest::Index(index)
        } else {
            let image: ImageManifest = serde_json::from_slice(bytes)
                .map_err(|source| ManifestError::Json { kind: "an image manifest", source })?;
            if image.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(image.schema_version));
            }
            Manifest::Image(image)
        };
        Ok(manifest)
    }

    /// The media type to serve this manifest with.
    pub fn media_type(&self) -> &str {
        match self {
            Manifest::Image(m) => m.media_type.as_deref().unwrap_or(MEDIA_TYPE_IMAGE_MANIFEST),
            Manifest::Index(i) => i.media_type.as_deref().unwrap_or(MEDIA_TYPE_IMAGE_INDEX),
        }
    }

    pub fn artifact_type(&self) -> Option<&str> {
        match self {
            Manifest::Image(m) => m.artifact_type.as_deref().or(Some(m.config.media_type.as_str())),
            Manifest::Index(i) => i.artifact_type.as_deref(),
        }
    }

    pub fn subject(&self) -> Option<&Descriptor> {
        match self {
            Manifest::Image(m) => m.subject.as_ref(),
            Manifest::Index(i) => i.subject.as_ref(),
        }
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        match self {
            Manifest::Image(m) => &m.annotations,
            Manifest::Index(i) => &i.annotations,
        }
    }

    /// Every descriptor this manifest references and a registry must hold: config and layers, or
    /// the index's manifests.
    pub fn references(&self) -> Vec<&Descriptor> {
        match self {
            Manifest::Image(m) => std::iter::once(&m.config).chain(&m.layers).collect(),
            Manifest::Index(i) => i.manifests.iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_json(media_type: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": Digest::of(b"{}"), "size": 2},
            "layers": []
        });
        if let Some(mt) = media_type {
            v["mediaType"] = mt.into();
        }
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn parses_manifest_and_index_by_field_or_content_type() {
        let m = Manifest::parse(&image_json(Some(MEDIA_TYPE_IMAGE_MANIFEST)), None).expect("manifest");
        assert!(matches!(m, Manifest::Image(_)));
        assert_eq!(m.references().len(), 1);
        let m = Manifest::parse(&image_json(None), Some(MEDIA_TYPE_IMAGE_MANIFEST)).expect("by content type");
        assert_eq!(m.media_type(), MEDIA_TYPE_IMAGE_MANIFEST);
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(Manifest::parse(index, None).expect("index"), Manifest::Index(_)));
    }

    #[test]
    fn refuses_mismatched_or_malformed_manifests() {
        let m = Manifest::parse(&image_json(Some(MEDIA_TYPE_IMAGE_MANIFEST)), Some(MEDIA_TYPE_IMAGE_INDEX));
        assert!(matches!(m, Err(ManifestError::MediaTypeMismatch { .. })));
        assert!(matches!(Manifest::parse(b"not json", None), Err(ManifestError::Json { .. })));
        assert!(matches!(
            Manifest::parse(&image_json(Some("text/plain")), None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        let bad_digest = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":2}}"#;
        assert!(Manifest::parse(bad_digest, Some(MEDIA_TYPE_IMAGE_MANIFEST)).is_err());
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(Manifest::parse(&big, None), Err(ManifestError::TooLarge(_))));
    }
}
