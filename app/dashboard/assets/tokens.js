// The token view, drawn in the browser. callbacks.token_view sends the spans as data (the
// token-spans store, column-wise); drawTokens turns them into plain <span class="tok"> elements in
// #tokens-text. One Dash component per token instead (3,000 on a 4k-token run) froze the page for
// ~40 s while the renderer mounted them; plain DOM takes milliseconds.
window.dash_clientside = window.dash_clientside || {};
window.dash_clientside.attnlab = {
    drawTokens: function (data) {
        var box = document.getElementById("tokens-text");
        if (!box) {
            return window.dash_clientside.no_update;
        }
        var spans = document.createDocumentFragment();
        var n = data && data.text ? data.text.length : 0;
        for (var i = 0; i < n; i++) {
            var span = document.createElement("span");
            span.className = data.position[i] === data.selected ? "tok selected" : "tok";
            span.textContent = data.text[i];
            span.title = data.title[i];
            span.setAttribute("data-position", data.position[i]);
            span.style.backgroundColor = "rgba(214, 39, 40, " + data.alpha[i] + ")";
            spans.appendChild(span);
        }
        if (n && data.more > 0) {
            var more = document.createElement("span");
            more.textContent = " ... (" + data.more + " more tokens not drawn)";
            spans.appendChild(more);
        }
        box.replaceChildren(spans);
        return n;
    }
};

// One listener for the page: a click on a drawn token sets the token-click store, whose callback
// selects that token. "at" makes a second click on the same token a new value (a click on the
// pattern may have moved the selection in between).
document.addEventListener("click", function (event) {
    var target = event.target;
    var span = target && target.closest ? target.closest("#tokens-text .tok[data-position]") : null;
    if (!span || !window.dash_clientside.set_props) {
        return;
    }
    window.dash_clientside.set_props("token-click", {
        data: {position: Number(span.getAttribute("data-position")), at: Date.now()}
    });
});
