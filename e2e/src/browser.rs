//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`), for the web
//! console's end-to-end tests and benchmark: chromedriver on a free port with a fresh profile, both gone when
//! the browser is closed or dropped, and screenshots written where the test says.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

/// How long a wait for the page to show something lasts at most.
pub const WAIT: Duration = Duration::from_secs(45);

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    screenshots: PathBuf,
}

/// Where Debian installs them; `ALKI_CHROMEDRIVER` and `ALKI_CHROMIUM` override.
fn tool(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width`×`height`; screenshots go to
    /// `screenshots` (created).
    pub async fn start(screenshots: &Path, width: u32, height: u32) -> anyhow::Result<Browser> {
        let (driver_path, chromium) =
            (tool("ALKI_CHROMEDRIVER", "/usr/bin/chromedriver"), tool("ALKI_CHROMIUM", "/usr/bin/chromium"));
        anyhow::ensure!(
            driver_path.exists() && chromium.exists(),
            "the console's browser tests need Chromium and ChromeDriver: apt-get install chromium chromium-driver \
             (looked for {} and {})",
            chromium.display(),
            driver_path.display()
        );
        // More than one rustls provider is in the tree: say which (the controller's choice, ring).
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(screenshots).with_context(|| format!("creating {}", screenshots.display()))?;
        let port = crate::harness::free_port()?;
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver_path.display()))?;
        let profile = tempfile::tempdir()?;
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            // Without these Chromium keeps calling Google's services, which a closed network refuses.
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium.to_string_lossy(), "args": args }),
        );
        // The controller's TLS certificate is signed by its own CA.
        caps.insert("acceptInsecureCerts".into(), serde_json::json!(true));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let client = loop {
            match ClientBuilder::rustls()?.capabilities(caps.clone()).connect(&url).await {
                Ok(client) => break client,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("connecting to chromedriver"),
            }
        };
        Ok(Browser { client, driver, _profile: profile, screenshots: screenshots.to_owned() })
    }

    /// Waits until an element matches `css` (an attribute selector waits for a value), and returns it.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        let found =
            self.client.wait().at_most(WAIT).every(Duration::from_millis(50)).for_element(Locator::Css(css)).await;
        match found {
            Ok(element) => Ok(element),
            Err(e) => Err(anyhow::Error::new(e).context(format!("waiting for {css:?}: {}", self.describe().await))),
        }
    }

    /// Where the page is and what it shows, for a failed wait's message (and a screenshot of it).
    async fn describe(&self) -> String {
        let url = self.client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
        let shot = self.screenshot("failed-wait").await.map(|p| p.display().to_string()).unwrap_or_default();
        let body = self.client.execute("return document.body ? document.body.innerText : '';", vec![]).await;
        let body = body.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        format!("at {url}, screenshot {shot}, page text: {:?}", body.chars().take(600).collect::<String>())
    }

    /// Waits until the first element matching `css` shows exactly `text`. The element is found again on every
    /// look: a live page redraws, and an element held across a redraw goes stale.
    pub async fn wait_text(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await
                && let Ok(now) = element.text().await
            {
                if now == text {
                    return Ok(());
                }
                last = now;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("{css:?} shows {last:?}, not {text:?}: {}", self.describe().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until nothing matches `css`.
    pub async fn wait_gone(&self, css: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.client.find_all(Locator::Css(css)).await?.is_empty() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{css:?} still shown after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        Ok(self.client.find_all(Locator::Css(css)).await?.len())
    }

    /// The text of the first element matching `css`, waiting for it.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self.wait_for(css).await?.text().await?)
    }

    /// Writes a PNG of the window as `<name>.png` in the screenshots folder; returns its path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let path = self.screenshots.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Ends the browser session and chromedriver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let closed = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        closed.context("closing the browser")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
