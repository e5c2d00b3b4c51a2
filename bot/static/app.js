// tastefeed gallery: rate with a click or a key, move between cards with ← →.
//
// Keys are taken only where they mean something, and never from a form field (typing there, and
// ↑ ↓ there, stay the field's): For you: ← → (or j/k) move between cards, 1-5 rate the focused
// one; Picture: 1-5 rate it, [ ] step to the previous / next picture; Compare: ← → pick, ↓ or s skip, u undo last;
// Boxes: Enter or a accept, s skip, z or Backspace undo the last edit. Everywhere else, and
// ↑ ↓ on every page but Compare, the keys do what the browser does: scroll the page.
(() => {
  // cards that can be rated: For you's (to move between) and the Picture page's one
  const cards = Array.from(document.querySelectorAll("article.card")).filter((c) => c.querySelector("form.rate"));
  const single = document.querySelector("div.card form.rate") ? document.querySelector("div.card") : null;
  let at = -1;

  // Mark card i as the one the keys act on; scroll it into view only when asked (a key or a
  // rating moved to it), and only as far as needed: opening a page never scrolls it.
  function focusCard(i, scroll) {
    if (!cards.length) return;
    at = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c) => c.classList.remove("focused"));
    const card = cards[at];
    card.classList.add("focused");
    if (scroll) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  async function post(url, body) {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    if (!resp.ok) throw new Error(`${resp.status} ${await resp.text()}`);
    return resp.json();
  }

  async function rate(card, value) {
    const state = card.querySelector(".state, .current");
    try {
      await post(`/rate/${card.dataset.id}`, { value });
    } catch (err) {
      if (state) state.textContent = `not saved: ${err.message}`;
      return;
    }
    card.dataset.rated = String(value);
    card.querySelectorAll("form.rate button").forEach((b) => b.classList.toggle("chosen", b.value === String(value)));
    if (card.tagName === "ARTICLE") {
      card.classList.add("rated");
      if (state) state.textContent = `rated ${value}`;
      if (cards.includes(card)) focusCard(cards.indexOf(card) + 1, true);
    } else {
      if (state) state.textContent = String(value);
      refreshLabels();
    }
  }

  // Picture page: after a rating, the labels list is read again from the page (no reload).
  async function refreshLabels() {
    const list = document.querySelector("ul.labels");
    if (!list) return;
    try {
      const resp = await fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!resp.ok) return;
      const fresh = new DOMParser().parseFromString(await resp.text(), "text/html").querySelector("ul.labels");
      if (fresh) list.replaceWith(fresh);
    } catch (err) {
      // the rating is saved; the list shows it on the next visit
    }
  }

  document.querySelectorAll("form.rate").forEach((form) => {
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const card = form.closest(".card");
      if (card && e.submitter) rate(card, Number(e.submitter.value));
    });
  });

  document.querySelectorAll("form.undo").forEach((form) => {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const card = form.closest(".card");
      try {
        await post(form.action);
        card.remove();
      } catch (err) {
        form.querySelector("button").textContent = "failed";
      }
    });
  });

  // Picture page: a click on a face box (or its entry in the list) opens that face's naming form;
  // the forms post as JSON and the page reloads to show the name (without JS they post plainly).
  function openFace(id) {
    const entry = document.getElementById(`face-${id}`);
    if (!entry) return;
    document.querySelectorAll(".faces a.face, ol.facelist li").forEach((el) =>
      el.classList.toggle("selected", el.dataset.face === String(id)));
    const details = entry.querySelector("details.name-face");
    if (!details) return;  // the whole picture: nothing to name
    details.open = true;
    const input = details.querySelector("input[name=name]");
    input.focus();
    input.select();
  }

  document.querySelectorAll(".faces a[data-face]").forEach((a) => {
    a.addEventListener("click", (e) => {
      e.preventDefault();
      openFace(a.dataset.face);
    });
  });

  // Picture page: each face's label (its number, and character) is placed where it stays inside
  // the picture and clear of the other labels: above its box, else below, beside or inside it,
  // else the free spot nearest to it; first where it covers no face, then anywhere; a label that
  // fits nowhere with its name shows its number only. The places are in % of the picture, and
  // are worked out again whenever the picture changes size.
  const faceLayer = document.querySelector(".stage .faces");

  function placeLabels() {
    const W = faceLayer.clientWidth;
    const H = faceLayer.clientHeight;
    if (!W || !H) return;
    const hit = (r, p) => r.x < p.x + p.w + 1 && p.x < r.x + r.w + 1 && r.y < p.y + p.h + 1 && p.y < r.y + r.h + 1;
    const boxes = Array.from(faceLayer.querySelectorAll("a.face"), (f) =>
      ({ id: f.dataset.face, x: f.offsetLeft, y: f.offsetTop, w: f.offsetWidth, h: f.offsetHeight }));
    const placed = [];
    faceLayer.querySelectorAll("a.face-label").forEach((label) => {
      const b = boxes.find((f) => f.id === label.dataset.face);
      label.classList.add("placed");
      const tries = [];  // [short, far, covering faces allowed], in order of preference
      for (const cover of [false, true]) tries.push([false, false, cover], [false, true, cover], [true, false, cover], [true, true, cover]);
      let spot = null;
      for (const [short, far, cover] of tries) {
        label.classList.toggle("short", short);
        const w = Math.min(label.offsetWidth, W);
        const h = label.offsetHeight;
        const inX = (x) => Math.max(0, Math.min(W - w, x));
        const fits = (r) => r.x >= 0 && r.y >= 0 && r.x + r.w <= W && r.y + r.h <= H && !placed.some((p) => hit(r, p)) &&
          (cover || !boxes.some((f) => hit(r, { x: f.x + 1, y: f.y + 1, w: f.w - 2, h: f.h - 2 })));
        let spots;
        if (!far) {
          spots = [[b.x, b.y - h], [b.x, b.y + b.h], [b.x + b.w - w, b.y - h], [b.x + b.w - w, b.y + b.h],
            [b.x + b.w + 1, b.y], [b.x - w - 1, b.y], [b.x, b.y], [b.x, b.y + b.h - h]].map(([x, y]) => ({ x: inX(x), y, w, h }));
        } else {  // next to an edge of the picture, of a face or of a placed label, nearest first
          const xs = [0, W - w, inX(b.x), ...[...placed, ...boxes].flatMap((p) => [p.x + p.w + 1, p.x - w - 1, p.x])];
          const ys = [0, H - h, b.y - h, b.y + b.h, ...[...placed, ...boxes].flatMap((p) => [p.y + p.h + 1, p.y - h - 1, p.y])];
          const away = (r) => Math.hypot(r.x - b.x, r.y + h / 2 - (b.y + b.h / 2));
          spots = xs.flatMap((x) => ys.map((y) => ({ x, y, w, h }))).sort((p, q) => away(p) - away(q));
          if (!cover) spots = spots.filter((r) => away(r) < Math.max(b.w, b.h) + 4 * h);  // not lost far away
        }
        spot = spots.find(fits) || null;
        if (spot) break;
      }
      if (!spot) spot = { x: 0, y: 0, w: label.offsetWidth, h: label.offsetHeight };  // a picture too small for all
      placed.push(spot);
      label.style.left = `${(100 * spot.x) / W}%`;
      label.style.top = `${(100 * spot.y) / H}%`;
    });
  }

  if (faceLayer) {
    placeLabels();
    if (window.ResizeObserver) new ResizeObserver(placeLabels).observe(faceLayer);
    else window.addEventListener("resize", placeLabels);
  }

  // Picture page: [ and ] open the previous and next picture (the links above it).

  document.querySelectorAll("ol.facelist li[data-face]").forEach((li) => {
    li.addEventListener("click", (e) => {
      if (!e.target.closest("form, summary")) openFace(li.dataset.face);
    });
    li.addEventListener("keydown", (e) => {
      if (e.key === "Escape") li.querySelector("details.name-face").open = false;
    });
  });

  document.querySelectorAll("form.name-face, form.unname-face").forEach((form) => {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const input = form.querySelector("input[name=name]");
      const state = form.closest("li").querySelector(".name-state");
      try {
        await post(form.action, input ? { name: input.value } : {});
      } catch (err) {
        if (state) state.textContent = err.message.replace(/^\d+ /, "");
        return;
      }
      window.location.reload();
    });
  });

  // Compare page: ← picks the left picture, → the right one, ↓ or s skips, u takes the last back;
  // each clicks its button, so the form posts as without script (once: a held key does not answer twice).
  const compare = document.querySelector("form.compare");
  const undoCompare = document.querySelector("form.undo-compare");
  const compareKeys = { ArrowLeft: "button.pick.left", ArrowRight: "button.pick.right", ArrowDown: "button.skip", s: "button.skip" };
  let answered = false;

  function compareKey(e) {
    let button = compare && compareKeys[e.key] ? compare.querySelector(compareKeys[e.key]) : null;
    if (e.key === "u" && undoCompare) button = undoCompare.querySelector("button");
    if (!button) return;
    e.preventDefault();
    if (answered) return;
    answered = true;
    button.classList.add("chosen");
    button.click();
  }

  // Boxes page: the picture's face boxes, kept in picture pixels and drawn in % of it. A drag on
  // the picture draws a box (the owner's); a click on a box deletes it; z (or Backspace) undoes
  // the last edit. Accept (Enter or a) posts the boxes shown, and the picture is verified with
  // exactly those; Skip (s) passes it over. Both then open the next picture.
  const boxForm = document.querySelector("form.boxes");
  const boxLayer = boxForm && boxForm.querySelector(".box-layer");
  let boxes = [];
  const boxHistory = [];
  let boxBusy = false;

  function drawBoxes() {
    const W = Number(boxForm.dataset.width);
    const H = Number(boxForm.dataset.height);
    boxLayer.querySelectorAll(".pbox").forEach((el) => el.remove());
    boxes.forEach((b, i) => {
      const el = document.createElement("div");
      el.className = `pbox ${b.kind}`;
      el.dataset.index = String(i);
      el.title = `${b.kind}: ${b.origin} (click to delete)`;
      Object.assign(el.style, { left: `${(100 * b.x1) / W}%`, top: `${(100 * b.y1) / H}%`,
        width: `${(100 * (b.x2 - b.x1)) / W}%`, height: `${(100 * (b.y2 - b.y1)) / H}%` });
      boxLayer.appendChild(el);
    });
    boxForm.querySelector(".box-count").textContent = `${boxes.length} box(es)`;
    boxForm.querySelector("button.undo-edit").disabled = !boxHistory.length;
    boxForm.elements.boxes.value = JSON.stringify(boxes);
  }

  function editBoxes(next) {
    boxHistory.push(boxes);
    boxes = next;
    drawBoxes();
  }

  function undoBox() {
    if (!boxHistory.length) return;
    boxes = boxHistory.pop();
    drawBoxes();
  }

  async function answerBoxes(skip) {
    if (boxBusy) return;
    boxBusy = true;
    const id = Number(boxForm.dataset.id);
    const body = skip ? { id, skip: true } : { id, boxes: boxes.map(({ x1, y1, x2, y2 }) => ({ x1, y1, x2, y2 })) };
    try {
      await post("/boxes", body);
    } catch (err) {
      boxBusy = false;
      boxForm.querySelector(".box-state").textContent = `not saved: ${err.message.replace(/^\d+ /, "")}`;
      return;
    }
    window.location.assign("/boxes");
  }

  if (boxForm) {
    boxes = JSON.parse(boxForm.elements.boxes.value || "[]");
    boxForm.addEventListener("submit", (e) => {
      e.preventDefault();
      answerBoxes(Boolean(e.submitter && e.submitter.name === "skip"));
    });
    boxForm.querySelector("button.undo-edit").addEventListener("click", undoBox);
    if (!boxLayer) boxForm.querySelector("button.undo-edit").remove();
  }

  if (boxLayer) {
    drawBoxes();
    let start = null;   // {x, y (picture pixels), cx, cy (screen), target box index or null, the box drawn}
    const at = (e) => {
      const r = boxLayer.getBoundingClientRect();
      const W = Number(boxForm.dataset.width);
      const H = Number(boxForm.dataset.height);
      return { x: Math.max(0, Math.min(W, ((e.clientX - r.left) / r.width) * W)),
        y: Math.max(0, Math.min(H, ((e.clientY - r.top) / r.height) * H)) };
    };
    boxLayer.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      const p = at(e);
      const hit = e.target.closest(".pbox");
      start = { ...p, cx: e.clientX, cy: e.clientY, target: hit ? Number(hit.dataset.index) : null, el: null };
      boxLayer.setPointerCapture(e.pointerId);
    });
    boxLayer.addEventListener("pointermove", (e) => {
      if (!start) return;
      const p = at(e);
      const W = Number(boxForm.dataset.width);
      const H = Number(boxForm.dataset.height);
      if (!start.el) {
        if (Math.hypot(e.clientX - start.cx, e.clientY - start.cy) < 5) return;
        start.el = document.createElement("div");
        start.el.className = "pbox drawing";
        boxLayer.appendChild(start.el);
      }
      Object.assign(start.el.style, { left: `${(100 * Math.min(p.x, start.x)) / W}%`, top: `${(100 * Math.min(p.y, start.y)) / H}%`,
        width: `${(100 * Math.abs(p.x - start.x)) / W}%`, height: `${(100 * Math.abs(p.y - start.y)) / H}%` });
    });
    const finish = (e) => {
      if (!start) return;
      const s = start;
      start = null;
      if (s.el) s.el.remove();
      const p = at(e);
      const moved = Math.hypot(e.clientX - s.cx, e.clientY - s.cy) >= 5;
      if (!moved) {   // a click: on a box, it goes
        if (s.target !== null) editBoxes(boxes.filter((_, i) => i !== s.target));
        return;
      }
      const box = { x1: Math.round(Math.min(p.x, s.x)), y1: Math.round(Math.min(p.y, s.y)),
        x2: Math.round(Math.max(p.x, s.x)), y2: Math.round(Math.max(p.y, s.y)), origin: "owner", kind: "owner" };
      if (box.x2 - box.x1 >= 2 && box.y2 - box.y1 >= 2) editBoxes([...boxes, box]);
    };
    boxLayer.addEventListener("pointerup", finish);
    boxLayer.addEventListener("pointercancel", () => {
      if (start && start.el) start.el.remove();
      start = null;
    });
  }

  const boxKeys = { Enter: "accept", a: "accept", s: "skip", z: "undo", Backspace: "undo" };

  function boxesKey(e) {
    const what = boxKeys[e.key];
    if (!what || (what !== "skip" && !boxLayer)) return;   // a pruned picture: only skip
    if (e.key === "Enter" && e.target.closest && e.target.closest("a, button")) return;   // it clicks what has the focus
    e.preventDefault();
    if (what === "undo") undoBox();
    else answerBoxes(what === "skip");
  }

  // Tables fit the window (style.css): a cell with a long unbroken word is marked "long" (it
  // may break anywhere); on a phone, where a table is stacked, each cell shows its column's name,
  // taken from the header row (the cells of one <tr> all <th>).
  document.querySelectorAll("table").forEach((table) => {
    const rows = Array.from(table.rows);
    table.querySelectorAll("td, th").forEach((cell) => {
      if (/\S{24,}/.test(cell.textContent)) cell.classList.add("long");
    });
    const head = rows.find((r) => r.cells.length > 1 && Array.from(r.cells).every((c) => c.tagName === "TH"));
    if (!head) return;
    const names = Array.from(head.cells).map((c) => c.textContent.trim());
    rows.forEach((row) => Array.from(row.cells).forEach((cell, i) => {
      if (cell.tagName === "TD" && !cell.hasAttribute("data-label")) cell.dataset.label = cell.colSpan > 1 ? "" : names[i] || "";
    }));
  });

  // True when the key belongs to a form field (or an editable element): the page leaves it alone.
  function inField(target) {
    return Boolean(target.closest && target.closest("input, textarea, select, [contenteditable]"));
  }

  const moveKeys = { ArrowRight: 1, j: 1, ArrowLeft: -1, k: -1 };

  const stepKeys = { "[": "prev", "]": "next" };   // Picture page: previous / next picture

  document.addEventListener("keydown", (e) => {
    if (inField(e.target) || e.altKey || e.ctrlKey || e.metaKey || e.isComposing) return;
    const step = stepKeys[e.key] && document.querySelector(`p.steps a[rel=${stepKeys[e.key]}]`);
    if (step) {
      e.preventDefault();
      window.location.href = step.href;
      return;
    }
    if (compare || undoCompare) {
      compareKey(e);
      return;
    }
    if (boxForm) {
      boxesKey(e);
      return;
    }
    if (cards.length && moveKeys[e.key]) {
      focusCard(at + moveKeys[e.key], true);
      e.preventDefault();
    } else if (/^[1-5]$/.test(e.key) && (cards.length || single)) {
      if (cards.length && at < 0) focusCard(0, true);
      rate(cards.length ? cards[at] : single, Number(e.key));
      e.preventDefault();
    }
  });

  if (cards.length) focusCard(0, false);

  // Model page: while a training run is going, the page reloads itself to show its progress.
  const refresh = document.querySelector("[data-refresh]");
  if (refresh) setTimeout(() => window.location.reload(), Number(refresh.dataset.refresh) * 1000);
})();
