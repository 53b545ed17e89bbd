// The serial console: xterm.js over the daemon's WebSocket, which first
// replays the console log (the boot) and then follows it; what is typed
// reaches the guest's serial port. Several viewers may share a console.
//
// xterm.js makes <style> elements for its layout; the page's CSP allows
// only styles carrying this response's nonce, so give them that nonce
// (set before xterm.js loads; no other inline style is allowed).
const term_el = document.getElementById("serial-term");
const nonce = term_el.dataset.styleNonce;
const create = Document.prototype.createElement;
Document.prototype.createElement = function (tag, opts) {
  const el = create.call(this, tag, opts);
  if (String(tag).toLowerCase() === "style") {
    el.nonce = nonce;
    el.setAttribute("nonce", nonce);
  }
  return el;
};

const { Terminal } = await import("/ui/static/vendor/xterm/xterm.mjs");
const { FitAddon } = await import("/ui/static/vendor/xterm/addon-fit.mjs");
const { consoleSocket } = await import("/ui/static/app.js");

const status = document.getElementById("serial-status");
const vm = term_el.dataset.vm;
const term = new Terminal({ convertEol: false, scrollback: 10000, cursorBlink: true });
const fit = new FitAddon();
term.loadAddon(fit);
term.open(term_el);
fit.fit();
addEventListener("resize", () => fit.fit());
// For tests and for the curious: the text the terminal holds.
window.keelTerminalText = () => {
  const b = term.buffer.active;
  const lines = [];
  for (let i = 0; i < b.length; i++) lines.push(b.getLine(i)?.translateToString(true) ?? "");
  return lines.join("\n");
};

let ws = null;
const enc = new TextEncoder();
term.onData((d) => { if (ws?.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });

async function connect() {
  status.textContent = "Connecting…";
  let url;
  try {
    url = await consoleSocket(vm, "serial");
  } catch (e) {
    status.textContent = `Cannot open the console: ${e.message}`;
    return;
  }
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.addEventListener("open", () => {
    status.textContent = "Connected";
    term_el.dataset.connected = "true";
    term.focus();
  });
  ws.addEventListener("message", (m) => term.write(new Uint8Array(m.data)));
  ws.addEventListener("close", () => {
    term_el.dataset.connected = "false";
    status.textContent = "Disconnected: reconnecting…";
    term.reset();
    setTimeout(connect, 2000);
  });
}
connect();
