// The official openai Node SDK (openai/realtime/ws) transcribing one manual turn over wss://.
// usage: NODE_EXTRA_CA_CERTS=cert.pem node realtime_transcribe.mjs BASE_URL
// Sends 1 s of deterministic noise (24 kHz pcm16), commits, and prints one JSON line:
// {"deltas": "...", "transcript": "...", "url": "..."}; exits 1 on an error event or timeout.
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const baseURL = process.argv[2];
const client = new OpenAI({ apiKey: 'unused-on-loopback', baseURL });
const rt = new OpenAIRealtimeWS({ model: 'any' }, client);
const fail = (why) => { console.error(why); process.exit(1); };
const timer = setTimeout(() => fail('timed out'), 10000);
let deltas = '';

rt.on('error', (err) => fail(`error: ${err.message}`));
rt.on('conversation.item.input_audio_transcription.delta', (e) => { deltas += e.delta; });
rt.on('conversation.item.input_audio_transcription.completed', (e) => {
  console.log(JSON.stringify({ deltas, transcript: e.transcript, url: rt.url.toString() }));
  clearTimeout(timer);
  rt.close();
});
rt.socket.on('open', () => {
  rt.send({ type: 'session.update', session: { type: 'realtime', audio: { input: { turn_detection: null } } } });
  const pcm = Buffer.alloc(48000);
  let x = 12345;
  for (let i = 0; i < pcm.length; i += 2) {
    x = (x * 1103515245 + 12345) % 2147483648; // loud, deterministic noise
    pcm.writeInt16LE((x % 16000) - 8000, i);
  }
  rt.send({ type: 'input_audio_buffer.append', audio: pcm.toString('base64') });
  rt.send({ type: 'input_audio_buffer.commit' });
});
