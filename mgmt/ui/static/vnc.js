// The graphical console: noVNC over the daemon's WebSocket relay of the
// VM's private VNC socket, opened with a one-time ticket.
import RFB from "/ui/static/vendor/novnc/core/rfb.js";
import { consoleSocket } from "/ui/static/app.js";

const screen = document.getElementById("vnc-screen");
const status = document.getElementById("vnc-status");
const vm = screen.dataset.vm;
let rfb = null;

async function connect() {
  status.textContent = "Connecting…";
  let url;
  try {
    url = await consoleSocket(vm, "vnc");
  } catch (e) {
    status.textContent = `Cannot open the console: ${e.message}`;
    return;
  }
  rfb = new RFB(screen, url);
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    status.textContent = "Connected";
    screen.dataset.connected = "true";
  });
  rfb.addEventListener("disconnect", (e) => {
    screen.dataset.connected = "false";
    rfb = null;
    if (e.detail.clean) {
      status.textContent = "Disconnected (the VM stopped?)";
    } else {
      status.textContent = "Connection lost: reconnecting…";
      setTimeout(connect, 2000);
    }
  });
}

document.getElementById("vnc-cad").addEventListener("click", () => rfb?.sendCtrlAltDel());
connect();
